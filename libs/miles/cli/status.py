"""`miles status`: a run's progress and its live services, from the Redis record."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import redis
from rich.console import Console
from rich.table import Table

from miles.runtime.bus import Unreachable
from miles.runtime.replies import members
from miles.runtime.run_view import RunView
from miles.runtime.store import RUNS_KEY


def print_status(client: redis.Redis, run_id: str | None, as_json: bool) -> int:
    console = Console()
    runs = members(client.zrange(RUNS_KEY, 0, -1))
    if run_id is None:
        if not runs:
            console.print("no runs recorded in this Redis")
            return 1
        run_id = runs[-1]
    view = RunView.read(client, run_id)
    if not view.exists:
        console.print(f"no run {run_id!r}; known runs: {', '.join(runs) or 'none'}")
        return 1
    if as_json:
        print(json.dumps(view.summary() | {"live_services": view.live_services()}, indent=2))
        return 0
    record = view.record
    table = Table(title=f"run {run_id} ({record.status})", show_header=False)
    accuracy = view.accuracy()
    reward_mean = math.nan if record.reward_mean is None else record.reward_mean
    rows = {
        "step": f"{view.step} / {view.config.get('run', {}).get('steps', '?')}",
        "policy version": record.policy_version,
        "reward mean (last step)": f"{reward_mean:.3f}",
        "held-out accuracy": "-" if accuracy is None else f"{accuracy:.3f}",
        "samples/s": f"{view.samples_per_second():.2f}",
        "wall": f"{view.wall_seconds():.0f} s",
        "filtered groups": json.dumps(view.filtered),
        "dead letters": json.dumps(view.dead_letters),
        **view.headline(),  # the services' /metrics values, from their heartbeats
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)
    services = Table(title="services")
    columns = (
        "instance",
        "state",
        "last heartbeat",
        "busy s",
        "waiting s",
        "processed",
        "/metrics",
    )
    for column in columns:
        services.add_column(column)
    now = time.time()
    period = float(view.config.get("coordinator", {}).get("heartbeat_seconds", 2.0))
    for name, beat in sorted(view.services.items()):
        age = now - beat.time
        state = "alive" if age < 3 * period else "silent"  # the coordinator's rule, too
        services.add_row(
            name,
            state if record.status == "running" else "stopped",
            f"{age:.1f} s ago",
            f"{beat.busy_seconds:.1f}",
            f"{beat.wait_seconds:.1f}",
            str(beat.processed),
            f":{beat.metrics_port}" if beat.metrics_port else "-",
        )
    console.print(services)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def run(args: argparse.Namespace) -> int:
    if not args.redis_url:
        print("miles status needs --redis-url or REDIS_URL", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(args.redis_url, decode_responses=True, socket_connect_timeout=3)
    try:
        return print_status(client, args.run_id, as_json=args.json)
    except redis.exceptions.ConnectionError as exc:
        raise Unreachable(f"cannot reach Redis at {args.redis_url}: {exc}") from exc
