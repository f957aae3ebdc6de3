"""What tracing and metrics cost the demo: its samples/s with telemetry on and off.

Each leg is `miles run` of the addition demo (five service processes, embedded NATS and Redis,
a local Ray), short. Legs alternate off, on, off, on, ... in this one benchmark, so a drift of
the machine hits both sides alike; the ratio is the mean samples/s on over off.

- off: no ``OTEL_*`` exporter (the tracer stays the API's no-op) and ``infra.metrics_port=off``
  (no /metrics server). The in-process metric updates still happen: the heartbeats carry
  their snapshot to `miles status`, so they cannot be switched off.
- on: every span exported over OTLP/HTTP (protobuf, batched) to a receiver in this process
  that decodes each request, and /metrics on every service scraped once a second from here,
  as a Prometheus would.

samples/s is the run's own figure (trained samples over the RL loop's wall time, from
``summary.json``). Prints a table and writes benchmarks/results/bench_telemetry.json; nothing
is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"
RESULTS = ROOT / "benchmarks" / "results" / "bench_telemetry.json"


class Spans:
    """Counts the spans OTLP/HTTP requests carry."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self.lock:
            self.count += spans


@contextlib.contextmanager
def otlp_receiver(spans: Spans) -> Iterator[int]:
    reply = ExportTraceServiceResponse().SerializeToString()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            spans.add(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def scrape_while(run_dir: Path, running: threading.Event, scrapes: list[int]) -> None:
    """Scrape every service's /metrics once a second while the run goes."""
    ports_file = run_dir / "metrics_ports.json"
    while running.is_set():
        if ports_file.exists():
            for port in json.loads(ports_file.read_text()).values():
                url = f"http://127.0.0.1:{port}/metrics"
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                    scrapes[0] += 1
        time.sleep(1.0)


def leg(root: Path, name: str, telemetry: bool, steps: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    for variable in ("NATS_URL", "REDIS_URL", "RAY_ADDRESS"):
        env.pop(variable, None)
    command = [
        sys.executable,
        "-m",
        "miles.cli",
        "run",
        str(RECIPE),
        "--quiet",
        "--run-id",
        name,
        "--set",
        f"run.output_dir='{root}'",
        "--set",
        f"run.steps={steps}",
        "--set",
        f"coordinator.eval_every={steps}",
        "--set",
        "data.eval_size=20",
    ]
    spans, scrapes = Spans(), [0]
    running = threading.Event()
    with contextlib.ExitStack() as stack:
        if telemetry:
            port = stack.enter_context(otlp_receiver(spans))
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
            running.set()
            scraper = threading.Thread(target=scrape_while, args=(root / name, running, scrapes))
            scraper.start()
            stack.callback(scraper.join)
            stack.callback(running.clear)
        else:
            command += ["--set", "infra.metrics_port=off"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = json.loads((root / name / "summary.json").read_text())
    return {
        "name": name,
        "telemetry": telemetry,
        "samples_per_second": summary["samples_per_second"],
        "wall_seconds": summary["wall_seconds"],
        "spans": spans.count,
        "scrapes": scrapes[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per leg")
    parser.add_argument("--pairs", type=int, default=3, help="off/on pairs")
    args = parser.parse_args()
    legs = []
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        for pair in range(args.pairs):
            for telemetry in (False, True):
                name = f"{'on' if telemetry else 'off'}{pair}"
                legs.append(leg(Path(tmp), name, telemetry, args.steps))
                row = legs[-1]
                print(
                    f"{name:>5}: {row['samples_per_second']:7.1f} samples/s "
                    f"({row['wall_seconds']:.1f} s, {row['spans']} spans, "
                    f"{row['scrapes']} scrapes)",
                    flush=True,
                )
    off = [row["samples_per_second"] for row in legs if not row["telemetry"]]
    on = [row["samples_per_second"] for row in legs if row["telemetry"]]
    ratio = statistics.fmean(on) / statistics.fmean(off)
    spans = [row["spans"] for row in legs if row["telemetry"]]
    result = {
        "steps_per_leg": args.steps,
        "samples_per_second_off": off,
        "samples_per_second_on": on,
        "ratio_on_over_off": round(ratio, 3),
        "spans_per_step": round(statistics.fmean(spans) / args.steps, 1),
        "legs": legs,
    }
    print(
        f"\nsamples/s off {statistics.fmean(off):.1f}, on {statistics.fmean(on):.1f}: "
        f"ratio on/off {ratio:.3f}; {result['spans_per_step']} spans per step (evaluations "
        "included)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
