"""The observed run's parts: a real Prometheus server and what the run left behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from observability import DEPLOY, OtlpReceiver

from miles.runtime import embedded

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"
RUN_ID = "observed"
STEPS = 4


@dataclass
class Prometheus:
    """A real Prometheus server on a loopback port, with its HTTP API."""

    process: subprocess.Popen[bytes]
    url: str

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query now: each series' labels (as a sorted string) -> its value."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {
            json.dumps(row["metric"], sort_keys=True): float(row["value"][1])
            for row in data["result"]
        }

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus ingested from its scrapes."""
        return set(self.api("label/__name__/values"))


@dataclass
class ObservedRun:
    run_dir: Path
    output: str
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    receiver: OtlpReceiver
    prometheus: Prometheus | None
    prometheus_missing: str


@contextlib.contextmanager
def serve_prometheus(directory: Path, targets: Path) -> Iterator[Prometheus]:
    """Prometheus scraping the services ``targets`` (the file_sd list `miles run` writes) every
    second, with deploy/'s alert rules loaded (so a rule it cannot parse fails here too)."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "miles",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = embedded.free_port()
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready in 60 s"
            time.sleep(0.5)
        yield server
    finally:
        embedded.stop_process(process, timeout=15)
        log.close()
