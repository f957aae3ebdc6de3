"""One short observed run for the observability tests: `miles run` of the demo recipe (four
steps, five service processes, embedded NATS and Redis, a local Ray) with its traces exported
over OTLP/HTTP to a real receiver, and a real Prometheus (Debian's ``prometheus``) scraping
every service's /metrics while it runs."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest
from launch import miles_run
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
        # Its own Ray head, as `make demo` starts one.
        exporter = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
        done = miles_run(
            RECIPE, root, RUN_ID, "--set", "data.eval_size=20", steps=STEPS, env=exporter
        )
        yield ObservedRun(
            run_dir=run_dir,
            output=done.stdout,
            summary=done.summary,
            steps=done.steps,
            receiver=receiver,
            prometheus=prometheus,
            prometheus_missing=missing,
        )
