"""How a command-line tool reaches a run (``miles.cli.common.run_urls``): the URLs given, else
the config's, else the operator's on the servers `miles run` embedded (whose config.json carries
no passwords)."""

from __future__ import annotations

import json
from pathlib import Path

from miles.cli.common import run_urls
from miles.config import load_config


def embed(run_dir: Path, users: dict[str, str]) -> None:
    for server in ("nats", "redis"):
        (run_dir / server).mkdir(parents=True)
        urls = {
            user: f"{server}://{user}:{password}@127.0.0.1:1" for user, password in users.items()
        }
        (run_dir / server / "urls.json").write_text(json.dumps(urls))


def test_the_operators_urls_stand_in_for_those_a_saved_config_leaves_out(tmp_path: Path) -> None:
    embed(tmp_path, {"admin": "a", "operator": "o"})
    saved = load_config()
    assert run_urls(tmp_path, saved, None, None) == (
        "nats://operator:o@127.0.0.1:1",
        "redis://operator:o@127.0.0.1:1",
    )
    assert run_urls(tmp_path, saved, "nats://given", None)[0] == "nats://given"
    configured = load_config(overrides=['infra.redis_url="redis://configured"'])
    assert run_urls(tmp_path, configured, None, None)[1] == "redis://configured"


def test_servers_without_per_service_users_give_nothing(tmp_path: Path) -> None:
    embed(tmp_path, {"admin": "a"})
    assert run_urls(tmp_path, load_config(), None, None) == (None, None)
    assert run_urls(tmp_path / "elsewhere", load_config(), None, None) == (None, None)
