"""One short observed run for the observability tests: `miles run` of the demo recipe (four
steps, five service processes, embedded NATS and Redis, a local Ray) with its traces exported
over OTLP/HTTP to a real receiver, and a real Prometheus (Debian's ``prometheus``) scraping
every service's /metrics while it runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from observability import serve_otlp
from observed import RECIPE, RUN_ID, STEPS, ObservedRun, serve_prometheus


@pytest.fixture(scope="session")
def observed_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObservedRun]:
    root = tmp_path_factory.mktemp("observed")
    run_dir = root / RUN_ID
    run_dir.mkdir()
    missing = ""
    if shutil.which("prometheus") is None:
        missing = (
            "no `prometheus` binary: `make system-deps` installs Debian's prometheus package "
            "with apt-get (not available on this machine, or the install failed)"
        )
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(serve_otlp())
        prometheus = None
        if not missing:
            directory = root / "prometheus"
            directory.mkdir()
            targets = run_dir / "prometheus_targets.json"
            prometheus = stack.enter_context(serve_prometheus(directory, targets))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        for name in ("NATS_URL", "REDIS_URL", "RAY_ADDRESS"):
            env.pop(name, None)
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"
        command = [
            sys.executable,
            "-m",
            "miles.cli",
            "run",
            str(RECIPE),
            "--quiet",
            "--run-id",
            RUN_ID,
            "--set",
            f"run.output_dir='{root}'",
            "--set",
            f"run.steps={STEPS}",
            "--set",
            f"coordinator.eval_every={STEPS}",
            "--set",
            "data.eval_size=20",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        steps_file = (run_dir / "steps.jsonl").read_text().splitlines()
        yield ObservedRun(
            run_dir=run_dir,
            output=done.stdout,
            summary=json.loads((run_dir / "summary.json").read_text()),
            steps=[json.loads(line) for line in steps_file],
            receiver=receiver,
            prometheus=prometheus,
            prometheus_missing=missing,
        )
