"""The `miles` command: run a recipe on this machine, serve one service, or show a run's status."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from pathlib import Path

import redis

from miles import plan_cli
from miles.bus import Unreachable
from miles.config import MilesConfig, load_config
from miles.recipe import RecipeError, load_recipe

SERVICES = ("coordinator", "rollout", "reward", "buffer", "trainer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miles",
        description="RL post-training of LLMs as five services on NATS JetStream.",
        epilog="Environment: NATS_URL, REDIS_URL, RAY_ADDRESS point at existing servers; "
        "unset, `miles run` starts embedded ones.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a recipe end to end on this machine",
        description="Start NATS, Redis and Ray if needed, then the five services "
        "as separate processes; show live progress; write runs/<id>/summary.json.",
    )
    run.add_argument("recipe", type=Path, nargs="?", help="the recipe file (Python)")
    _config_args(run)
    run.add_argument("--run-id", help="run id (default: <run.name>-<time>)")
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue an interrupted run from its latest manifest (same id, data and config)",
    )
    run.add_argument(
        "--output-dir", type=Path, default=Path("runs"), help="where --resume finds RUN_ID"
    )
    run.add_argument("--quiet", action="store_true", help="no live view; one line per step")

    serve = sub.add_parser(
        "serve",
        help="run one service against existing NATS/Redis/Ray",
        description="Run one service of a run. Any number of rollout and "
        "reward replicas may serve the same run.",
    )
    serve.add_argument("service", choices=SERVICES, help="which service")
    serve.add_argument("--recipe", type=Path, required=True, help="the recipe file (Python)")
    serve.add_argument("--run-id", required=True, help="the run to join")
    serve.add_argument("--run-dir", type=Path, help="local directory for this run's files")
    _config_args(serve)

    status = sub.add_parser(
        "status",
        help="where a run stands, read from Redis",
        description="Print step, policy version, reward, accuracy, samples/s "
        "and live services. Without RUN, list runs.",
    )
    status.add_argument("run_id", nargs="?", metavar="RUN", help="run id (default: the latest)")
    status.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="Redis holding the run records (default: $REDIS_URL)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")

    report = sub.add_parser(
        "report",
        help="plots and a markdown summary of a run",
        description="Write PNG plots (reward mean and distribution per step, held-out "
        "accuracy, time per phase, bleed) and report.md. Reads the run from Redis when "
        "--redis-url / REDIS_URL reaches one that holds it, else from the files `miles run` "
        "wrote in runs/<id>/ (summary.json, steps.jsonl, metrics.json).",
    )
    report.add_argument("run", metavar="RUN", help="run id, or a run directory")
    report.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL"
    )
    report.add_argument(
        "--output-dir", type=Path, default=Path("runs"), help="where run ids are found"
    )
    report.add_argument("--out", type=Path, help="where to write (default: <run dir>/report)")
    plan_cli.add_parser(sub)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML overriding the recipe's config, or a resolved config.json"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. trainer.lr=1e-5",
    )


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


def cmd_serve(args: argparse.Namespace) -> int:
    from miles.service import run_service

    recipe = load_recipe(args.recipe)
    config = resolve_config(recipe.config, args.config, args.overrides)
    if not config.infra.nats_url or not config.infra.redis_url:
        print(
            "miles serve needs NATS_URL and REDIS_URL (or infra.nats_url / infra.redis_url)",
            file=sys.stderr,
        )
        return 2
    run_dir = args.run_dir or config.run.output_dir / args.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    main = importlib.import_module(f"services.{args.service}.main").main
    asyncio.run(run_service(args.service, main, config, recipe, args.run_id, run_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from miles.status import print_status

    if not args.redis_url:
        print("miles status needs --redis-url or REDIS_URL", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(args.redis_url, decode_responses=True, socket_connect_timeout=3)
    try:
        return print_status(client, args.run_id, as_json=args.json)
    except redis.exceptions.ConnectionError as exc:
        raise Unreachable(f"cannot reach Redis at {args.redis_url}: {exc}") from exc


def cmd_report(args: argparse.Namespace) -> int:
    from miles.report import load, write_report

    data, run_dir = load(args.run, args.redis_url, args.output_dir)
    for path in write_report(data, args.out or run_dir / "report"):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MILES_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("nats", "ray", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "run":
            from miles.launcher import launch

            return launch(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "plan":
            return plan_cli.run(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_status(args)
    except (Unreachable, RecipeError, FileNotFoundError) as exc:
        print(f"miles: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: say what is wrong
        print(f"miles: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
