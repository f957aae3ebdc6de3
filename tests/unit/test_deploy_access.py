"""deploy/'s access configs are what the permissions table says, and docker-compose.yml gives
each service only its own credentials: the generated files are fresh, each service connects as
itself, the servers know every identity, and deploy/render.sh fills the configs in (or stops)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from miles.runtime.permissions import IDENTITIES, OPERATOR
from miles.runtime.service import SERVICES

ROOT = Path(__file__).parents[2]
RENDER = ROOT / "deploy" / "render.sh"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "miles_deploy_generate", ROOT / "deploy" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_files_are_what_the_generator_writes() -> None:
    files = generator().files()
    assert ROOT / "deploy" / "nats" / "authorization.conf" in files
    assert ROOT / "deploy" / "redis" / "users.acl" in files
    stale = [
        str(p.relative_to(ROOT))
        for p, text in files.items()
        if not p.exists() or p.read_text() != text
    ]
    assert stale == [], "run `.venv/bin/python deploy/generate.py`"


def test_every_identity_has_a_user_on_both_servers() -> None:
    authorization = (ROOT / "deploy" / "nats" / "authorization.conf").read_text()
    acl = (ROOT / "deploy" / "redis" / "users.acl").read_text().splitlines()
    assert acl[0].startswith("user default off")
    for identity in IDENTITIES:
        assert (
            f'user: "{identity}"\n      password: $NATS_{identity.upper()}_PASSWORD'
            in authorization
        )
        [line] = [row for row in acl if row.startswith(f"user {identity} on ")]
        assert f">{{{{REDIS_{identity.upper()}_PASSWORD}}}}" in line.split()


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_each_service_connects_as_itself_with_its_own_password() -> None:
    services = _compose()
    for identity, name in [*((s, s) for s in SERVICES), (OPERATOR, "cli")]:
        environment = services[name]["environment"]
        nats_password = f"NATS_{identity.upper()}_PASSWORD"
        redis_password = f"REDIS_{identity.upper()}_PASSWORD"
        assert environment["NATS_URL"] == (
            f"nats://{identity}:${{{nats_password}:?set {nats_password}}}@nats:4222"
        )
        assert environment["REDIS_URL"] == (
            f"redis://{identity}:${{{redis_password}:?set {redis_password}}}@redis:6379/0"
        )
        secrets = [value for value in environment.values() if "_PASSWORD" in str(value)]
        assert len(secrets) == 2, (name, secrets)  # no other identity's


def test_the_servers_get_every_password_and_the_run_id() -> None:
    services = _compose()
    run_id = services["coordinator"]["environment"]["MILES_RUN_ID"]
    for server, system in (("nats", "NATS"), ("redis", "REDIS")):
        environment = services[server]["environment"]
        assert environment["MILES_RUN_ID"] == run_id  # the run its configs are scoped to
        for identity in IDENTITIES:
            assert f"{system}_{identity.upper()}_PASSWORD" in environment
        command = services[server]["command"]
        assert command[:2] == ["sh", "/usr/local/lib/miles/render.sh"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[server]["volumes"]}
        assert mounts[command[2]] == f"./deploy/{server}"
        assert mounts["/usr/local/lib/miles/render.sh"] == "./deploy/render.sh"
    assert "--user operator" in services["redis"]["healthcheck"]["test"][1]


def test_render_fills_in_the_environment_privately(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    (source / "users.acl").write_text("user a on >{{PASS_A}} ~miles:run:{{RUN}} ~{{RUN}}:x\n")
    (source / "plain.conf").write_text("listen: 1 # $JS.API stays\n")
    env = {"PASS_A": "p/&\\1", "RUN": "r-1", "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", str(RENDER), str(source), str(target), "true"], env=env, check=True)
    assert (target / "users.acl").read_text() == "user a on >p/&\\1 ~miles:run:r-1 ~r-1:x\n"
    assert (target / "plain.conf").read_text() == "listen: 1 # $JS.API stays\n"
    assert (target / "users.acl").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("value", [None, ""])
def test_render_stops_when_a_variable_is_missing(tmp_path: Path, value: str | None) -> None:
    (tmp_path / "users.acl").write_text("user a on >{{PASS_A}}\n")
    env = {"PATH": "/usr/bin:/bin"} | ({} if value is None else {"PASS_A": value})
    done = subprocess.run(
        ["sh", str(RENDER), str(tmp_path), str(tmp_path / "out"), "echo", "started"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "started" not in done.stdout
    assert "PASS_A is not set" in done.stderr
