"""What several commands share: the config flags and how a config is resolved."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from miles.config import ALGORITHMS, MilesConfig, load_config
from miles.runtime import embedded
from miles.runtime.permissions import OPERATOR
from miles.runtime.subjects import check_run_id


def config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML overriding the recipe's config, or a resolved config.json"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. trainer.lr=1e-5. algorithm.name=NAME switches the RL "
        f"algorithm to its paper's defaults: {', '.join(ALGORITHMS)} (README, 'Algorithms')",
    )


def run_id_arg(value: str) -> str:
    """argparse type for a run id: it becomes part of NATS subjects and Redis keys, so ``.``,
    ``*`` or ``>`` would change what they mean."""
    try:
        return check_run_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def resolve_config(
    recipe_config: MilesConfig, path: Path | None, overrides: list[str]
) -> MilesConfig:
    if path is not None and path.suffix == ".json":  # a resolved config, as `miles run` saves
        config = load_config(MilesConfig.model_validate_json(path.read_text()), None, overrides)
    else:
        config = load_config(recipe_config, path, overrides)
    infra = config.infra
    infra.nats_url = infra.nats_url or os.environ.get("NATS_URL")
    infra.redis_url = infra.redis_url or os.environ.get("REDIS_URL")
    infra.ray_address = infra.ray_address or os.environ.get("RAY_ADDRESS")
    return config


def run_urls(
    run_dir: Path, config: MilesConfig, nats_url: str | None, redis_url: str | None
) -> tuple[str | None, str | None]:
    """The NATS and Redis URLs a command-line tool reaches a run with: those given (flags,
    ``NATS_URL``/``REDIS_URL``), else the run's config's, else the operator's on the servers
    `miles run` embedded in ``run_dir`` (its config.json carries no passwords)."""
    nats_url = nats_url or config.infra.nats_url
    redis_url = redis_url or config.infra.redis_url
    if nats_url and redis_url:
        return nats_url, redis_url
    try:
        embedded_nats, embedded_redis = embedded.service_urls(run_dir, OPERATOR)
    except KeyError:  # servers embedded without per-service users
        return nats_url, redis_url
    return nats_url or embedded_nats, redis_url or embedded_redis
