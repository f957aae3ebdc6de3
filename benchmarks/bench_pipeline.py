"""Pipeline efficiency: miles' own cost per step, on simulated compute, against the ideal.

The real five services run as `miles serve` processes (several rollout replicas) against a
nats-server, a redis-server and a local Ray this script owns, with simulated engines
(``rollout.engine = "simulated"``: they sleep for their tokens, inside the rollout processes)
and a simulated trainer (``trainer.backend = "simulated"``: it sleeps for its step, on a Ray
actor). The compute takes the time it is told to and no CPU, so what is left is miles.

Baseline, from the same run: the ideal step. The trainer needs ``T = seconds_per_step +
seconds_per_sample * samples`` per step; the rollout needs ``R = load_seconds + prefill_seconds
+ longest response / tokens_per_second`` over the step's samples (all of a step's groups can
generate at once on fresh weights; response lengths are functions of the sampling seeds, so R is
computed for the very samples each step trained). Ideal: ``R + T`` strictly on-policy
(max_staleness 0), ``max(R, T)`` with k >= 1. Overhead = measured step - ideal (steady state:
the first ``--warmup`` steps left out). A simulated engine has no capacity limit (concurrent
calls each run at the full rate), so with k >= 2 the rollouts of two steps overlap and a step
can beat ``max(R, T)`` down to ``T``: there a negative overhead means the trainer's step is the
bound, and step / T is the figure to read. Bleed: the services' ``miles_bleed_ratio`` gauges,
averaged over the steady state.

``--throughput`` measures the control plane instead: 1,000 engines over several replicas,
compute too fast to matter, groups and samples per second trained, and each process's CPU
share (the one at 100% of a core is where it saturates).

Prints tables and writes benchmarks/results/bench_pipeline.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from miles import events
from miles.config import MilesConfig, load_config
from miles.engine.generation import sample_seed
from miles.engine.simulated import batch_seconds, response_length
from miles.runtime import embedded, raycluster
from miles.runtime.run_view import RunView
from miles.runtime.store import RunKeys
from miles.telemetry.readout import Readout

ROOT = Path(__file__).parents[1]
RECIPE = '''
import zlib

import miles


@miles.reward
def spread(sample: miles.Sample) -> float:
    """A reward in [0, 1) from the sample id: every group has variance, none is filtered."""
    return (zlib.crc32(sample.sample_id.encode()) % 1000) / 1000
'''
BLEED_SIDES = ("trainer_waiting_for_data", "rollout_waiting_for_weights")


@dataclass
class Scenario:
    name: str
    engines: int
    replicas: int
    staleness: int
    groups_per_batch: int
    steps: int
    overrides: list[str] = field(default_factory=list)

    def settings(self) -> list[str]:
        per_replica = -(-self.engines // self.replicas)
        in_flight = (self.staleness + 2) * self.groups_per_batch
        return [
            "rollout.engine='simulated'",
            "trainer.backend='simulated'",
            f"rollout.engines={per_replica}",
            f"rollout.tasks_per_fetch={max(8, per_replica)}",
            f"buffer.max_staleness={self.staleness}",
            f"buffer.groups_per_batch={self.groups_per_batch}",
            f"coordinator.max_groups_in_flight={in_flight}",
            f"run.steps={self.steps}",
            *self.overrides,
        ]


class Cluster:
    """nats-server, redis-server and a Ray head shared by every scenario (runs are isolated by
    their run id), plus the tiny tokenizer, the prompts and the recipe."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.nats = embedded.start_nats(work / "nats")
        self.redis = embedded.start_redis(work / "redis")
        self.ray = raycluster.start_local(work)
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        self.model = tiny_model(work / "model")
        self.prompts = work / "prompts.jsonl"
        rows = (json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) for i in range(5000))
        self.prompts.write_text("\n".join(rows) + "\n")
        self.recipe = work / "recipe.py"
        self.recipe.write_text(RECIPE)

    def config(self, scenario: Scenario) -> MilesConfig:
        return load_config(
            overrides=[
                f"model.path='{self.model}'",
                f"data.train_path='{self.prompts}'",
                f"infra.nats_url='{self.nats.url}'",
                f"infra.redis_url='{self.redis.url}'",
                f"infra.ray_address='{self.ray}'",
                "infra.metrics_port='off'",
                *scenario.settings(),
            ]
        )

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.nats.stop()
        self.redis.stop()


def tiny_model(directory: Path) -> Path:
    """The demo's character tokenizer and a tiny Llama, built offline (only the tokenizer is
    read: simulated engines and trainer load no model)."""
    sys.path.insert(0, str(ROOT / "examples" / "addition"))
    import task  # type: ignore[import-not-found]

    tokenizer = task.build_tokenizer(directory)
    task.make_model(tokenizer).save_pretrained(str(directory))
    return directory


@dataclass
class Services:
    """The `miles serve` processes of one run."""

    processes: dict[str, subprocess.Popen[bytes]]

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        run_id: str,
        config: MilesConfig,
        replicas: int,
        profile: Path | None = None,
    ) -> Services:
        run_dir = cluster.work / run_id
        (run_dir / "logs").mkdir(parents=True)
        config_path = run_dir / "config.json"
        config_path.write_text(config.model_dump_json())
        env = os.environ | {"RAY_ADDRESS": cluster.ray, "PYTHONUNBUFFERED": "1"}
        names = ["coordinator", *[f"rollout-{i}" for i in range(replicas)]]
        names += ["reward", "buffer", "trainer"]
        processes = {}
        for name in names:
            argv = [sys.executable, "-m", "miles.cli", "serve", name.split("-")[0]]
            if profile is not None:  # cProfile writes <name>.prof when the service exits
                profile.mkdir(parents=True, exist_ok=True)
                argv[1:1] = ["-m", "cProfile", "-o", str(profile / f"{name}.prof")]
            argv += ["--recipe", str(cluster.recipe), "--run-id", run_id]
            argv += ["--run-dir", str(run_dir), "--config", str(config_path)]
            log = (run_dir / "logs" / f"{name}.log").open("wb")
            processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        return cls(processes)

    def check(self) -> None:
        for name, process in self.processes.items():
            if process.poll() not in (None, 0):
                raise RuntimeError(f"{name} exited with {process.returncode}")

    def cpu_seconds(self) -> dict[str, float]:
        return {name: process_cpu(p.pid) for name, p in self.processes.items()}

    def stop(self) -> None:
        for process in self.processes.values():
            embedded.stop_process(process, timeout=30)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    cluster: Cluster, scenario: Scenario, warmup: int, profile: Path | None = None
) -> dict[str, Any]:
    run_id = f"pipe-{scenario.name}-{int(time.time())}"
    config = cluster.config(scenario)
    services = Services.start(cluster, run_id, config, scenario.replicas, profile)
    keys = RunKeys(run_id)
    servers = {"nats-server": cluster.nats.process.pid, "redis-server": cluster.redis.process.pid}
    bleeds: dict[str, list[float]] = {side: [] for side in BLEED_SIDES}
    window: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 600 + 20 * scenario.steps
        while True:
            services.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{scenario.name} did not finish")
            step = int(cluster.client.get(keys.latest) or 0)
            if step >= warmup and "start" not in window:  # the steady state: CPU from here
                window["start"] = snapshot(cluster.client, keys, services, servers)
            if "start" in window and step < scenario.steps:
                key = Readout(beats(cluster.client, keys).values()).key_metrics()
                for side in BLEED_SIDES:
                    if key["bleed_ratio"][side] is not None:
                        bleeds[side].append(key["bleed_ratio"][side])
            finished = cluster.client.hget(keys.record, "status") == "finished"
            if (step >= scenario.steps or finished) and "end" not in window:
                # the last step can commit, and the run finish, between two polls
                window["end"] = snapshot(cluster.client, keys, services, servers)
            if finished:
                break
            time.sleep(0.25)
    finally:
        services.stop()
    view = RunView.read(cluster.client, run_id)
    return measure(scenario, config, view, warmup, bleeds, window)


def snapshot(
    client: redis.Redis, keys: RunKeys, services: Services, servers: dict[str, int]
) -> dict[str, Any]:
    cpu = services.cpu_seconds() | {name: process_cpu(pid) for name, pid in servers.items()}
    return {"wall": time.monotonic(), "cpu": cpu, "beats": beats(client, keys)}


def beats(client: redis.Redis, keys: RunKeys) -> dict[str, dict[str, Any]]:
    return {name: json.loads(beat) for name, beat in client.hgetall(keys.services).items()}


def rollout_seconds(config: MilesConfig, sample_ids: list[str]) -> float:
    """What the engines needed for these samples: one batch on fresh weights (``R``)."""
    simulated, rollout = config.rollout.simulated, config.rollout
    lengths = []
    for sample_id in sample_ids:
        task_id, index = sample_id.split("/")
        cursor = int(task_id[1:])
        task = events.Task(
            run_id="-",
            policy_version=0,
            task_id=task_id,
            prompt="",
            label="",
            group_size=rollout.group_size,
            seed=config.run.seed * 1_000_003 + cursor,  # sources.training_task's seed
        )
        seed = sample_seed(task, int(index))
        lengths.append(response_length(seed, simulated, rollout.max_new_tokens))
    return simulated.load_seconds + batch_seconds(lengths, simulated)


def measure(
    scenario: Scenario,
    config: MilesConfig,
    view: RunView,
    warmup: int,
    bleeds: dict[str, list[float]],
    window: dict[str, Any],
) -> dict[str, Any]:
    steps = sorted(view.steps, key=lambda manifest: manifest.step)
    steady = [s for s in steps if s.step > warmup]
    trainer = config.trainer.simulated
    step_seconds = (steady[-1].time - steps[warmup - 1].time) / len(steady)
    rollout = statistics.fmean(rollout_seconds(config, s.sample_ids) for s in steady)
    train = statistics.fmean(
        trainer.seconds_per_step + trainer.seconds_per_sample * s.samples + trainer.save_seconds
        for s in steady
    )
    ideal = rollout + train if scenario.staleness == 0 else max(rollout, train)
    samples = sum(s.samples for s in steady)
    start, end = window["start"], window["end"]
    wall = end["wall"] - start["wall"]
    cpu = {name: (end["cpu"][name] - start["cpu"][name]) / wall for name in end["cpu"]}
    busy = {}
    for instance, beat in end["beats"].items():
        before = start["beats"].get(instance, {"busy_seconds": 0.0, "wait_seconds": 0.0})
        spent = beat["busy_seconds"] - before["busy_seconds"]
        total = spent + beat["wait_seconds"] - before["wait_seconds"]
        busy[f"{beat['service']}/{instance.rsplit('-', 1)[-1]}"] = spent / total if total else 0.0
    span = steady[-1].time - steps[warmup - 1].time
    return {
        "scenario": asdict(scenario),
        "steps_measured": len(steady),
        "step_seconds": step_seconds,
        "rollout_seconds": rollout,
        "train_seconds": train,
        "ideal_seconds": ideal,
        "step_over_ideal": step_seconds / ideal,
        "overhead_seconds": step_seconds - ideal,
        "overhead_share": (step_seconds - ideal) / step_seconds,
        "bleed": {side: statistics.fmean(v) if v else None for side, v in bleeds.items()},
        "groups_per_second": len(steady) * scenario.groups_per_batch / span,
        "samples_per_second": samples / span,
        "cpu_cores": cpu,
        "busy_share": busy,
    }


PIPELINE = [
    "rollout.group_size=8",
    "rollout.max_new_tokens=512",
    "rollout.simulated.tokens_per_second=100",
    "rollout.simulated.length_mean=64",
    "rollout.simulated.length_sigma=0.5",
    "rollout.simulated.load_seconds=0.3",
    "trainer.simulated.seconds_per_step=2.0",
]
"""Phases of seconds: R about 2-3 s (longest of the step's lognormal responses at 100
tokens/s, plus a 0.3 s weight load), T = 2 s: the hardest case for overlap is R close to T."""

THROUGHPUT = [
    "rollout.group_size=8",
    "rollout.max_new_tokens=32",
    "rollout.simulated.tokens_per_second=100000",
    "rollout.simulated.length_mean=16",
    "rollout.simulated.length_sigma=0.5",
    "trainer.simulated.seconds_per_step=0.0",
]
"""Compute too fast to matter (a batch of 32 tokens takes 0.3 ms): what is measured is miles."""

MODES = {"sync": 0, "k1": 1, "k2": 2}
REPLICAS = {1: 1, 8: 2, 64: 4, 256: 4}


def pipeline_scenarios(engines: list[int], modes: list[str], steps: int) -> list[Scenario]:
    return [
        Scenario(
            f"{mode}-e{count}",
            engines=count,
            replicas=REPLICAS.get(count, 4),
            staleness=MODES[mode],
            groups_per_batch=max(8, count),
            steps=steps,
            overrides=PIPELINE,
        )
        for count in engines  # each fleet's modes together: a cut-short matrix still compares
        for mode in modes
    ]


def print_pipeline(rows: list[dict[str, Any]]) -> None:
    """The table; ``sync/step`` is the speed-up over the sync run of the same fleet, measured in
    this invocation (when it ran)."""
    sync = {r["scenario"]["engines"]: r for r in rows if r["scenario"]["staleness"] == 0}
    print(
        f"{'mode':<6}{'engines':>8}{'repl':>5}{'R s':>7}{'T s':>7}{'ideal s':>9}{'step s':>8}"
        f"{'step/ideal':>11}{'overhead s':>11}{'overhead':>9}{'bleed T':>9}{'bleed R':>9}"
        f"{'sync/step':>10}"
    )
    for row in rows:
        print_row(row, sync.get(row["scenario"]["engines"]))


def print_row(row: dict[str, Any], sync: dict[str, Any] | None = None) -> None:
    scenario, bleed = row["scenario"], row["bleed"]
    mode = {0: "sync", 1: "k=1", 2: "k=2"}[scenario["staleness"]]
    speedup = "-" if sync is None else f"{sync['step_seconds'] / row['step_seconds']:.2f}x"
    print(
        f"{mode:<6}{scenario['engines']:>8}{scenario['replicas']:>5}"
        f"{row['rollout_seconds']:>7.2f}{row['train_seconds']:>7.2f}"
        f"{row['ideal_seconds']:>9.2f}{row['step_seconds']:>8.2f}"
        f"{row['step_over_ideal']:>10.3f}x{row['overhead_seconds']:>11.3f}"
        f"{row['overhead_share']:>9.1%}{_pct(bleed['trainer_waiting_for_data']):>9}"
        f"{_pct(bleed['rollout_waiting_for_weights']):>9}{speedup:>10}",
        flush=True,
    )


def print_throughput(row: dict[str, Any]) -> None:
    scenario = row["scenario"]
    print(
        f"\n{scenario['engines']} engines over {scenario['replicas']} rollout replicas, "
        f"k={scenario['staleness']}, {scenario['groups_per_batch']} groups per batch: "
        f"{row['groups_per_second']:.0f} groups/s, {row['samples_per_second']:.0f} samples/s "
        f"({row['step_seconds'] * 1000:.0f} ms per step)"
    )
    print(f"{'process':<22}{'CPU cores':>10}")
    for name, cores in sorted(row["cpu_cores"].items(), key=lambda item: -item[1]):
        print(f"{name:<22}{cores:>10.2f}")
    print(f"{'service instance':<22}{'busy share':>10}")
    for name, share in sorted(row["busy_share"].items(), key=lambda item: -item[1]):
        print(f"{name:<22}{share:>10.0%}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", type=int, nargs="*", default=[1, 8, 64, 256])
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the measure")
    parser.add_argument("--throughput", action="store_true", help="the 1,000-engine run only")
    parser.add_argument("--throughput-engines", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--groups-per-batch", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", type=Path, help="keep the runs (logs) here; default: a temp dir")
    parser.add_argument(
        "--profile", type=Path, help="run each service under cProfile, writing DIR/<service>.prof"
    )
    args = parser.parse_args()
    out = Path(__file__).parent / "results" / "bench_pipeline.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="miles-bench-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(work)
        try:
            if args.throughput:
                scenario = Scenario(
                    "throughput",
                    engines=args.throughput_engines,
                    replicas=args.replicas,
                    staleness=2,
                    groups_per_batch=args.groups_per_batch,
                    steps=args.steps,
                    overrides=THROUGHPUT + args.overrides,
                )
                row = run(cluster, scenario, args.warmup, args.profile)
                print_throughput(row)
                results[f"throughput/e{scenario.engines}"] = row
            else:
                rows = []
                for scenario in pipeline_scenarios(args.engines, args.modes, args.steps):
                    scenario.overrides = scenario.overrides + args.overrides
                    rows.append(run(cluster, scenario, args.warmup))
                    print_row(rows[-1])
                    results[f"pipeline/{scenario.name}"] = rows[-1]
                    save(out, results)  # a long matrix keeps what it measured
                print()
                print_pipeline(rows)
        finally:
            cluster.close()
    save(out, results)
    print(f"wrote {out}")


def save(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
