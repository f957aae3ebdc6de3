"""Every algorithm on the addition demo: held-out accuracy before -> after, and seconds per step.

For each algorithm and seed, one `miles run` of examples/addition/recipe.py with
``--set algorithm.name=<name> --set run.seed=<seed>`` (each algorithm from its paper's defaults;
``grpo`` is the recipe's own GRPO; ``VARIANTS`` holds DPO's learning rate and the ``dpo+nll``
row), ``--steps`` steps, on one local Ray cluster this script starts and embedded NATS and Redis
per run. The seed changes the data, the warm start and
sampling, so "before" moves with it.

Baseline: GRPO, run in the same process; the table gives each algorithm's gain and seconds per
step as a ratio to GRPO's. Prints the table and writes benchmarks/results/bench_algorithms.json.
Nothing is asserted: tests/e2e/test_algorithms.py holds the learning bar.

    python benchmarks/bench_algorithms.py                 # all, seeds 0 1 2, 40 steps
    python benchmarks/bench_algorithms.py --algorithms grpo rloo --seeds 0
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
from pathlib import Path

from miles.config import ALGORITHMS
from miles.runtime import raycluster

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"


VARIANTS: dict[str, list[str]] = {name: [f"algorithm.name={name}"] for name in ALGORITHMS}
# DPO at the recipe's RL learning rate (3e-4) rises by step 10 and then falls below where it
# started (the chosen likelihood drops with the rejected one): plain DPO runs at 1e-4, and RPO's
# NLL term on the chosen response (algorithm.nll_coef) at the recipe's rate.
VARIANTS["dpo"] += ["trainer.lr=1e-4"]
VARIANTS["dpo+nll"] = ["algorithm.name=dpo", "algorithm.nll_coef=1.0"]
# DAPO's soft overlong punishment starts at max_new_tokens - L_cache: with the demo's budget of
# 4 tokens every 3-digit answer (3 digits and EOS) is punished to a reward of 0. With 8 tokens
# the punishment only reaches answers longer than any right one.
VARIANTS["dapo+len8"] = ["algorithm.name=dapo", "rollout.max_new_tokens=8"]


def run(work: Path, ray_address: str, algorithm: str, seed: int, steps: int) -> dict:
    run_id = f"bench-{algorithm.replace('_', '-').replace('+', '-')}-s{seed}"
    settings = [
        *VARIANTS[algorithm],
        f"run.seed={seed}",
        f"run.steps={steps}",
        f"coordinator.eval_every={steps}",
        f"run.output_dir='{work}'",
    ]
    command = [sys.executable, "-m", "miles.cli", "run", str(RECIPE), "--quiet"]
    command += ["--run-id", run_id, *(arg for s in settings for arg in ("--set", s))]
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL")}
    env["RAY_ADDRESS"] = ray_address
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{run_id} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    summary = json.loads((work / run_id / "summary.json").read_text())
    return {
        "algorithm": algorithm,
        "seed": seed,
        "before": summary["accuracy_before"],
        "after": summary["accuracy_after"],
        "seconds_per_step": summary["wall_seconds"] / summary["steps"],
        "process_seconds": time.perf_counter() - started,
    }


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/bench_algorithms.json"
    )
    args = parser.parse_args()
    algorithms = ["grpo", *(a for a in args.algorithms if a != "grpo")]  # the baseline first

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="miles-bench-algorithms-") as tmp:
        work = Path(tmp)
        address = raycluster.start_local(work)
        try:
            for algorithm in algorithms:
                for seed in args.seeds:
                    rows.append(run(work, address, algorithm, seed, args.steps))
                    print(
                        f"  {algorithm} seed {seed}: {rows[-1]['before']:.3f} -> "
                        f"{rows[-1]['after']:.3f}",
                        flush=True,
                    )
        finally:
            import ray  # the head start_local owns lives as long as this driver

            ray.shutdown()

    table = []
    for algorithm in algorithms:
        mine = [r for r in rows if r["algorithm"] == algorithm]
        gains = [r["after"] - r["before"] for r in mine]
        table.append(
            {
                "algorithm": algorithm,
                "before_mean": statistics.mean(r["before"] for r in mine),
                "after_mean": statistics.mean(r["after"] for r in mine),
                "after_spread": spread([r["after"] for r in mine]),
                "gain_mean": statistics.mean(gains),
                "gain_spread": spread(gains),
                "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in mine),
            }
        )
    base = table[0]
    header = (
        "| algorithm | before | after (mean ± sd) | gain | gain / GRPO | s/step | s/step / GRPO |"
    )
    print(f"\n{args.steps} steps, seeds {args.seeds}\n{header}\n|---|---|---|---|---|---|---|")
    for row in table:
        gain_ratio = row["gain_mean"] / base["gain_mean"] if base["gain_mean"] else float("nan")
        print(
            f"| {row['algorithm']} | {row['before_mean']:.3f} | {row['after_mean']:.3f} ± "
            f"{row['after_spread']:.3f} | {row['gain_mean']:+.3f} ± {row['gain_spread']:.3f} | "
            f"{gain_ratio:.2f} | {row['seconds_per_step']:.2f} | "
            f"{row['seconds_per_step'] / base['seconds_per_step']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"steps": args.steps, "seeds": args.seeds, "runs": rows, "table": table}, indent=2
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
