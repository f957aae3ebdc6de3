"""The embedded servers' credentials without the servers: made once and kept private, handed to
each service as its own URLs, and kept out of what `miles run` saves and prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from miles.config import load_config
from miles.runtime import embedded
from miles.runtime.permissions import IDENTITIES


def test_passwords_are_made_once_private_and_kept(tmp_path: Path) -> None:
    only_admin = embedded._passwords(tmp_path, None)
    assert list(only_admin) == [embedded.ADMIN]
    everyone = embedded._passwords(tmp_path, "run-1")
    assert list(everyone) == [embedded.ADMIN, *IDENTITIES]
    assert everyone[embedded.ADMIN] == only_admin[embedded.ADMIN]  # a restart takes the same
    assert len(set(everyone.values())) == len(everyone)
    assert embedded._passwords(tmp_path, "run-1") == everyone
    assert (tmp_path / "passwords.json").stat().st_mode & 0o777 == 0o600


def test_a_private_file_is_private_even_when_it_existed(tmp_path: Path) -> None:
    path = tmp_path / "urls.json"
    path.write_text("{}")
    path.chmod(0o644)
    embedded._write_private(path, "secret")
    assert (path.read_text(), path.stat().st_mode & 0o777) == ("secret", 0o600)


def _urls(run_dir: Path, name: str, urls: dict[str, str]) -> None:
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / "urls.json").write_text(json.dumps(urls))


def test_each_service_gets_its_own_urls_for_the_servers_embedded(tmp_path: Path) -> None:
    _urls(tmp_path, "nats", {"rollout": "nats://rollout:p@127.0.0.1:1"})
    assert embedded.service_env(tmp_path, "rollout") == {"NATS_URL": "nats://rollout:p@127.0.0.1:1"}
    _urls(tmp_path, "redis", {"rollout": "redis://rollout:q@127.0.0.1:2/0"})
    assert embedded.service_urls(tmp_path, "rollout") == (
        "nats://rollout:p@127.0.0.1:1",
        "redis://rollout:q@127.0.0.1:2/0",
    )
    with pytest.raises(KeyError, match="start the server with a run_id"):
        embedded.service_urls(tmp_path, "trainer")


def test_the_services_config_has_no_embedded_url(tmp_path: Path) -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    admin = "nats://admin:secret@127.0.0.1:4222"
    server = embedded.Server("nats-server", admin, 4222, process)
    config = load_config(overrides=[f'infra.nats_url="{admin}"', 'infra.redis_url="redis://x/0"'])
    shared = embedded.for_services(config, [server])
    assert (shared.infra.nats_url, shared.infra.redis_url) == (None, "redis://x/0")
    assert config.infra.nats_url == admin  # the launcher's own stays
    assert "secret" not in shared.model_dump_json()


def test_redact_hides_only_the_password() -> None:
    assert (
        embedded.redact("nats://admin:s3cret@127.0.0.1:4222") == "nats://admin:***@127.0.0.1:4222"
    )
    assert embedded.redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert embedded.redact(None) is None
