"""`miles serve SERVICE`: one service of a run, against existing NATS, Redis and Ray."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from miles import models
from miles.cli.common import config_args, resolve_config, run_id_arg
from miles.recipe import load_recipe
from miles.runtime.service import SERVICES, run_service
from services.registry import service_main


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run one service against existing NATS/Redis/Ray",
        description="Run one service of a run. Any number of rollout and "
        "reward replicas may serve the same run.",
    )
    serve.add_argument("service", choices=SERVICES, help="which service")
    serve.add_argument("--recipe", type=Path, required=True, help="the recipe file (Python)")
    serve.add_argument("--run-id", type=run_id_arg, required=True, help="the run to join")
    serve.add_argument("--run-dir", type=Path, help="local directory for this run's files")
    config_args(serve)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    config = models.resolve(resolve_config(recipe.config, args.config, args.overrides))
    if not config.infra.nats_url or not config.infra.redis_url:
        print(
            "miles serve needs NATS_URL and REDIS_URL (or infra.nats_url / infra.redis_url)",
            file=sys.stderr,
        )
        return 2
    run_dir = args.run_dir or config.run.output_dir / args.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    main = service_main(args.service)
    asyncio.run(run_service(args.service, main, config, recipe, args.run_id, run_dir))
    return 0
