"""Chaos runs: the demo's recipe, short, as `miles run` subprocesses against NATS and Redis the
tests own (so they can kill them) and one shared Ray."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from miles.runtime import embedded

from .accounting import Audit, audit

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"
STEPS = 5
SETTINGS = [
    f"run.steps={STEPS}",
    "buffer.groups_per_batch=4",
    "buffer.max_staleness=0",
    "data.eval_size=20",
    "coordinator.eval_every=100",
]


@dataclass
class Finished:
    run_id: str
    run_dir: Path
    returncode: int
    output: str
    summary: dict

    def log(self, service: str) -> str:
        return (self.run_dir / "logs" / f"{service}.log").read_text()


@dataclass
class Chaos:
    nats: embedded.Server
    redis: embedded.Server
    ray_address: str
    root: Path

    def run(
        self,
        run_id: str,
        crash_at: str | None = None,
        during: Callable[[subprocess.Popen[str]], None] | None = None,
        timeout: float = 300,
        embedded_servers: bool = False,
        resume: bool = False,
        settings: Sequence[str] = (),
    ) -> Finished:
        """`miles run` to the end; ``crash_at`` arms a kill point, ``during`` runs alongside.

        ``embedded_servers``: `miles run` starts its own nats-server and redis-server in the
        run directory instead of using the test's; ``resume``: `miles run --resume run_id`;
        ``settings``: more ``--set`` overrides after the suite's.
        """
        command = [sys.executable, "-m", "miles.cli", "run", "--quiet"]
        if resume:
            command += ["--resume", run_id, "--output-dir", str(self.root)]
        else:
            command += [str(RECIPE), "--run-id", run_id, "--set", f"run.output_dir='{self.root}'"]
            for setting in [*SETTINGS, *settings]:
                command += ["--set", setting]
        env = os.environ | {"RAY_ADDRESS": self.ray_address}
        if embedded_servers:
            env.pop("NATS_URL", None)
            env.pop("REDIS_URL", None)
        else:
            env |= {"NATS_URL": self.nats.url, "REDIS_URL": self.redis.url}
        env.pop("MILES_CRASH_AT", None)
        if crash_at:
            env |= {"MILES_CRASH_AT": crash_at, "MILES_CRASH_ONCE": str(self.marker(run_id))}
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Ctrl-C as from a terminal: a test run started in the background (`make test &`,
            # nohup, some CI runners) inherits SIGINT ignored, and Python keeps it ignored.
            preexec_fn=_default_sigint,
        )
        side = threading.Thread(target=during, args=(process,)) if during else None
        if side:
            side.start()
        try:
            output, _ = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
            if side:
                side.join()
        run_dir = self.root / run_id
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        return Finished(run_id, run_dir, process.returncode, output, summary)

    def audit(self, run_id: str) -> Audit:
        """The accounting of run ``run_id`` (``accounting.audit``) from the suite's servers."""

        async def read() -> Audit:
            client = aioredis.Redis.from_url(self.redis.url, decode_responses=True)
            try:
                return await audit(self.nats.url, client, run_id)
            finally:
                await client.aclose()

        return asyncio.run(read())

    def marker(self, run_id: str) -> Path:
        return self.root / f"{run_id}.crashed"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def chaos(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: embedded.Server,
    redis_server: embedded.Server,
    ray_cluster: str,
) -> Chaos:
    return Chaos(nats_server, redis_server, ray_cluster, tmp_path_factory.mktemp("chaos"))
