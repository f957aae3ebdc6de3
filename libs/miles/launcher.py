"""`miles run`: everything on this machine, each service its own OS process.

resolve the config, run the recipe's @miles.setup
start nats-server and redis-server (unless NATS_URL / REDIS_URL) and a local Ray head
start the five services with `miles serve`, restarting a crashed one with backoff
show live progress until the coordinator reports the run finished
write runs/<run_id>/summary.json and stop everything, Ctrl-C included
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from miles import embedded, raycluster
from miles.cli import SERVICES, resolve_config
from miles.live import LiveView
from miles.recipe import load_recipe
from miles.summary import RunView


@dataclass
class Child:
    """One supervised service process."""

    service: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 1.0
    log_handles: list[object] = field(default_factory=list)

    def start(self) -> None:
        handle = self.log_path.open("ab")
        self.log_handles.append(handle)
        self.process = subprocess.Popen(
            self.argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env
        )

    def stop(self) -> None:
        if self.process:
            embedded.stop_process(self.process, timeout=15)
        for handle in self.log_handles:
            handle.close()  # type: ignore[attr-defined]


def launch(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    config = resolve_config(recipe.config, args.config, args.overrides)
    run_id = (
        args.run_id or f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    run_dir = (config.run.output_dir / run_id).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if recipe.setup is not None:
        print(f"miles: running {recipe.setup.__name__}() from {recipe.path.name}", flush=True)
        config = recipe.setup(config)

    servers: list[embedded.Server] = []
    children: list[Child] = []
    started_ray = False
    try:
        if not config.infra.nats_url:
            servers.append(embedded.start_nats(run_dir / "nats"))
            config.infra.nats_url = servers[-1].url
        if not config.infra.redis_url:
            servers.append(embedded.start_redis(run_dir / "redis"))
            config.infra.redis_url = servers[-1].url
        if not config.infra.ray_address:
            config.infra.ray_address = raycluster.start_local(run_dir)
            started_ray = True
        config_path = run_dir / "config.json"
        config_path.write_text(config.model_dump_json(indent=2))
        print(
            f"miles: run {run_id} in {run_dir}\n  nats {config.infra.nats_url}  redis "
            f"{config.infra.redis_url}  ray {config.infra.ray_address}",
            flush=True,
        )

        env = os.environ | {"RAY_ADDRESS": config.infra.ray_address, "PYTHONUNBUFFERED": "1"}
        for service in SERVICES:
            argv = [
                sys.executable,
                "-m",
                "miles.cli",
                "serve",
                service,
                "--recipe",
                str(recipe.path),
                "--run-id",
                run_id,
                "--run-dir",
                str(run_dir),
                "--config",
                str(config_path),
            ]
            child = Child(service, argv, run_dir / "logs" / f"{service}.log", env)
            child.start()
            children.append(child)

        client = redis.Redis.from_url(config.infra.redis_url, decode_responses=True)
        finished, peak_processes = supervise(
            children, client, run_id, config.run.steps, quiet=args.quiet
        )
        view = RunView.read(client, run_id)
        summary = view.summary() | {
            "restarts": {c.service: c.restarts for c in children},
            "os_processes_peak": peak_processes,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        LiveView.final(summary, run_dir)
        return 0 if finished else 1
    finally:
        for child in children:
            child.stop()
        if started_ray:
            import ray

            ray.shutdown()
        for server in servers:
            server.stop()


def supervise(
    children: list[Child], client: redis.Redis, run_id: str, steps: int, quiet: bool
) -> tuple[bool, int]:
    """Restart crashed services with backoff; return (finished, peak OS process count)."""
    coordinator = children[0]
    peak = 0
    with LiveView(run_id, steps, quiet=quiet) as live:
        for tick in itertools.count():
            live.update(RunView.read(client, run_id))
            if tick % 20 == 0:
                peak = max(peak, count_processes())
            for child in children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or (code == 0 and child is not coordinator):
                    continue  # running, or stopped on purpose (the run finished)
                if child is coordinator and code == 0:
                    wait_for_exit(children[1:], timeout=30)
                    live.update(RunView.read(client, run_id))
                    return RunView.read(client, run_id).run.get("status") == "finished", peak
                if time.monotonic() >= child.next_start:
                    child.restarts += 1
                    live.log(
                        f"{child.service} exited with code {code}; restart "
                        f"#{child.restarts} (log: {child.log_path})"
                    )
                    if child.restarts > 5:
                        live.log(f"{child.service} keeps crashing; giving up")
                        return False, peak
                    child.next_start = time.monotonic() + child.backoff
                    child.backoff = min(child.backoff * 2, 30)
                    child.start()
            time.sleep(0.5)
    raise AssertionError("unreachable")


def wait_for_exit(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        assert child.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))


def count_processes() -> int:
    """This process and all its descendants: services, embedded servers, Ray and its workers."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    family = {os.getpid()}
    grew = True
    while grew:
        before = len(family)
        family |= {pid for pid, ppid in parents.items() if ppid in family}
        grew = len(family) > before
    return len(family)
