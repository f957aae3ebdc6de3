"""`miles pause RUN`, `miles resume RUN`, `miles drain RUN`: an operator's commands to a running
run, sent as ``Control`` events on its control subject and obeyed by its coordinator
(``services/coordinator/operator.py``).

Broadcasts are at most once (a coordinator restarting at that moment misses one), so the
command is sent again every ``RESEND_SECONDS`` until the run record says it took effect, for
up to ``WAIT_SECONDS``; then one line says what the run is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import redis

from miles import events
from miles.cli.common import run_urls
from miles.cli.export import load_run
from miles.runtime.bus import NatsBus, Unreachable, connect_nats
from miles.runtime.run_record import RunRecord
from miles.runtime.store import RunKeys

COMMANDS = {
    "pause": "stop dispatching new work; what is in flight still trains",
    "resume": "dispatch again after a pause, or cancel a drain",
    "drain": "finish the steps in flight, commit, and stop at that step (resumable)",
}
RESEND_SECONDS = 2.0
WAIT_SECONDS = 30.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for command, purpose in COMMANDS.items():
        parser = sub.add_parser(command, help=purpose, description=f"{command}: {purpose}.")
        parser.add_argument("run", metavar="RUN", help="run id, or a run directory")
        parser.add_argument("--reason", default="", help="recorded in the services' logs")
        parser.add_argument(
            "--output-dir", type=Path, default=Path("runs"), help="where run ids are found"
        )
        parser.add_argument(
            "--nats-url", default=os.environ.get("NATS_URL"), help="default: $NATS_URL"
        )
        parser.add_argument(
            "--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL"
        )


def took_effect(command: str, record: RunRecord) -> bool:
    if command == "pause":
        return bool(record.paused)
    if command == "resume":
        return not record.paused and not record.drain_step
    return bool(record.drain_step) or record.status == "drained"


def outcome(command: str, run_id: str, record: RunRecord) -> str:
    if command == "pause":
        return f"run {run_id} paused at step {record.step}: `miles resume {run_id}` goes on"
    if command == "resume":
        return f"run {run_id} dispatching again at step {record.step}"
    return (
        f"run {run_id} draining: it stops once step {record.drain_step} is committed "
        f"(now at {record.step}); `miles run --resume {run_id}` continues it"
    )


def run(args: argparse.Namespace) -> int:
    run_id, run_dir, config = load_run(args.run, args.output_dir, args.redis_url)
    nats_url, redis_url = run_urls(run_dir, config, args.nats_url, args.redis_url)
    if not nats_url or not redis_url:
        raise Unreachable(f"no NATS or Redis URL for run {run_id}: set NATS_URL and REDIS_URL")
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=3)
    try:
        record = asyncio.run(send(args.command, args.reason, run_id, nats_url, client))
    finally:
        client.close()
    if record is None:
        print(
            f"miles: run {run_id} did not take `{args.command}` within {WAIT_SECONDS:.0f} s: "
            "is its coordinator running? (`miles status`)"
        )
        return 1
    print(f"miles: {outcome(args.command, run_id, record)}")
    return 0


async def send(
    command: str, reason: str, run_id: str, nats_url: str, client: redis.Redis
) -> RunRecord | None:
    """Send ``command`` until the run record shows it; None when it never did."""
    nc = await connect_nats(nats_url, 5, name="miles-control")
    bus = NatsBus(nc, run_id, "operator", 1 << 20)
    try:
        control = events.Control(
            run_id=run_id,
            policy_version=0,
            command=command,  # type: ignore[arg-type]  # one of COMMANDS, by argparse
            reason=reason or "operator",
        )
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            await bus.broadcast(bus.subjects.control(command), control)
            resend = time.monotonic() + RESEND_SECONDS
            while time.monotonic() < min(resend, deadline):
                record = read(client, run_id)
                if took_effect(command, record):
                    return record
                await asyncio.sleep(0.2)
        return None
    finally:
        await nc.close()


def read(client: redis.Redis, run_id: str) -> RunRecord:
    try:
        return RunRecord.decode(client.hgetall(RunKeys(run_id).record))  # type: ignore[arg-type]
    except redis.exceptions.ConnectionError as exc:
        raise Unreachable(f"cannot reach the run's Redis ({exc})") from None
