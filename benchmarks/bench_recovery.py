"""Recovery time: SIGKILL one component of a running loop, measure kill -> next committed step.

One `miles run` of the demo recipe (strict on-policy) runs against a nats-server and a
redis-server this script owns, so it can kill them too. Each component is killed ``--kills``
times, each time after the loop is back to steady state (two steps committed since the last
recovery):

- a service (coordinator, rollout, reward, buffer, trainer): SIGKILL the pid its latest
  heartbeat names; `miles run`'s supervisor starts it again alone;
- nats-server / redis-server: SIGKILL, then start it again at once on the same port and store
  (JetStream file store, Redis AOF), as a process supervisor (systemd, Kubernetes) would.

Baseline: the median interval between two commits without a fault, measured in the same run.
Prints p50/p95/max per component with the ratio to the baseline and writes
benchmarks/results/bench_recovery.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from miles.runtime import embedded, raycluster
from miles.runtime.store import RunKeys

ROOT = Path(__file__).parents[1]
SERVICES = ("coordinator", "rollout", "reward", "buffer", "trainer")
SERVERS = ("nats-server", "redis-server")


class Loop:
    def __init__(self, work: Path, steps: int) -> None:
        self.nats = embedded.start_nats(work / "nats")
        self.redis = embedded.start_redis(work / "redis")
        self.ray = raycluster.start_local(work)
        self.run_id = f"bench-recovery-{int(time.time())}"
        self.keys = RunKeys(self.run_id)
        command = [
            sys.executable,
            "-m",
            "miles.cli",
            "run",
            str(ROOT / "examples/addition/recipe.py"),
        ]
        command += ["--quiet", "--run-id", self.run_id, "--set", f"run.output_dir='{work}'"]
        for setting in (f"run.steps={steps}", "data.eval_size=20", "coordinator.eval_every=100000"):
            command += ["--set", setting]
        env = os.environ | {
            "NATS_URL": self.nats.url,
            "REDIS_URL": self.redis.url,
            "RAY_ADDRESS": self.ray,
        }
        self.log = (work / "miles-run.log").open("w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)

    def latest(self) -> int:
        while True:
            try:
                return int(self.client.get(self.keys.latest) or 0)
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)  # redis-server is the one being restarted

    def commit_times(self, count: int, timeout: float = 300) -> list[float]:
        """Wait for ``count`` more commits; return when each was seen."""
        seen, times = self.latest(), []
        deadline = time.monotonic() + timeout
        while len(times) < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"miles run exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no step committed in {timeout}s")
            now = self.latest()
            if now > seen:
                times += [time.monotonic()] * (now - seen)
                seen = now
            time.sleep(0.02)
        return times

    def pid_of(self, service: str) -> int:
        beats = [json.loads(v) for v in self.client.hgetall(self.keys.services).values()]
        beats = [b for b in beats if b["service"] == service]
        return max(beats, key=lambda b: b["time"])["pid"]

    def kill(self, component: str) -> float:
        """SIGKILL ``component``; return the kill time (monotonic)."""
        if component in SERVERS:
            server = self.nats if component == "nats-server" else self.redis
            killed = time.monotonic()
            server.stop(kill=True)
            server.restart()
            return killed
        pid = self.pid_of(component)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        return killed

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        import ray

        ray.shutdown()
        self.nats.stop()
        self.redis.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kills per component")
    parser.add_argument("--components", nargs="*", default=[*SERVICES, *SERVERS])
    args = parser.parse_args()
    steps = 20 + 4 * args.kills * len(args.components)
    with tempfile.TemporaryDirectory(prefix="miles-bench-") as tmp:
        loop = Loop(Path(tmp), steps)
        try:
            print(f"warming up (run {loop.run_id}, {steps} steps planned)", flush=True)
            loop.commit_times(2, timeout=600)
            steady = loop.commit_times(6)
            intervals = [b - a for a, b in itertools.pairwise(steady)]
            baseline = statistics.median(intervals)
            results: dict[str, list[float]] = {}
            for component in args.components:
                for _ in range(args.kills):
                    killed = loop.kill(component)
                    recovered = loop.commit_times(1)[0]
                    results.setdefault(component, []).append(recovered - killed)
                    print(f"  {component}: {recovered - killed:.2f}s", flush=True)
                    loop.commit_times(2)  # steady again before the next kill
        finally:
            loop.close()
    rows = {
        name: {
            "kills": len(times),
            "p50_seconds": round(percentile(times, 0.5), 3),
            "p95_seconds": round(percentile(times, 0.95), 3),
            "max_seconds": round(max(times), 3),
            "p50_over_baseline": round(percentile(times, 0.5) / baseline, 1),
            "samples": [round(t, 3) for t in times],
        }
        for name, times in results.items()
    }
    print(f"\nbaseline: a commit every {baseline:.2f}s without faults")
    print(f"{'component':<14}{'kills':>6}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'p50/base':>10}")
    for name, row in rows.items():
        print(
            f"{name:<14}{row['kills']:>6}{row['p50_seconds']:>8.2f}{row['p95_seconds']:>8.2f}"
            f"{row['max_seconds']:>8.2f}{row['p50_over_baseline']:>9.1f}x"
        )
    out = Path(__file__).parent / "results" / "bench_recovery.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"baseline_step_seconds": baseline, "components": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
