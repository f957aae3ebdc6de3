"""The `miles` command: each subcommand is its own module in this package; this one parses
the command line, dispatches, and turns the errors a user can fix into one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from miles.cli import control, export, plan, report, run, serve, status, track
from miles.recipe import RecipeError
from miles.runtime.bus import Unreachable

COMMANDS = {
    "run": run,
    "serve": serve,
    "status": status,
    "report": report,
    "plan": plan,
    "track": track,
    "export": export,
    "pause": control,
    "resume": control,
    "drain": control,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miles",
        description="RL post-training of LLMs as five services on NATS JetStream.",
        epilog="Environment: NATS_URL, REDIS_URL, RAY_ADDRESS point at existing servers; "
        "unset, `miles run` starts embedded ones.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in dict.fromkeys(COMMANDS.values()):  # control adds three commands
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MILES_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("nats", "ray", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command].run(args)
    except (Unreachable, RecipeError, FileNotFoundError) as exc:
        print(f"miles: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # one line per field: where it is and what is wrong
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "config"
            print(f"miles: invalid configuration: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"miles: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
