"""miles against TRL's GRPOTrainer on the addition demo: samples/s and held-out accuracy.

The usual choice for a task this size is an in-process trainer: TRL's ``GRPOTrainer`` generates
with the policy's own ``generate`` and trains in the same Python process. This script runs it
and then ``miles run examples/addition/recipe.py`` one after the other, on the same machine,
from the same warm start (``examples/addition/task.py``: the sloppy teacher's model, cached
under ``runs/cache``), on the same training prompts, with the recipe's settings on both sides:

- G = 8 samples per prompt, 8 prompts (64 samples) per optimizer step, ``--steps`` steps;
- sampling at temperature 1.0, at most 4 new tokens;
- AdamW at lr 3e-4 (constant, no warmup, betas 0.9/0.999, no weight decay), grad clip 1.0;
- the clipped surrogate with eps 0.2 / 0.28 (DAPO's clip-higher), no KL term, advantages
  normalised within the group, the loss averaged over every token of the batch (TRL's
  ``loss_type="dapo"``, miles' ``aggregation="token_mean"``); one update per batch, so both
  are strictly on-policy (miles: ``buffer.max_staleness = 0``).

Held-out accuracy is measured here, for both, by one function: greedy decoding of the recipe's
200 held-out problems with ``transformers``' ``generate`` (miles' exported ``runs/<id>/final``,
TRL's trained model), exact match. miles' own evaluation of the same problems is printed next
to it as a cross-check.

samples/s counts trained samples over wall time: for TRL the ``train()`` call, for miles the
loop (first dispatch to last commit, its ``summary.json``); the start-up around each (model load
for TRL; Ray, NATS, Redis and five processes for miles) is a separate column. Baseline: TRL, run
in the same process first. Prints the table and writes benchmarks/results/bench_vs_trl.json.
Nothing is asserted.

    python benchmarks/bench_vs_trl.py              # 40 steps, seed 0
    python benchmarks/bench_vs_trl.py --steps 20 --seeds 0 1 2
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
from typing import Any

import torch

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"
sys.path.insert(0, str(RECIPE.parent))

import task  # noqa: E402  (examples/addition/task.py: the demo's data, warm start and reward)

DIGITS = 2
GROUP, PROMPTS_PER_STEP, NEW_TOKENS = 8, 8, DIGITS + 2
LR, EPS_LOW, EPS_HIGH, GRAD_CLIP = 3e-4, 0.2, 0.28, 1.0
EVAL_SIZE = 200


def prepare(seed: int) -> tuple[Path, Path]:
    """The recipe's own cache: its splits and its warm start (built once, then reused)."""
    cache = ROOT / "runs" / "cache" / f"addition-d{DIGITS}-s{seed}"
    task.write_splits(cache, train=5_000, eval=EVAL_SIZE, seed=seed, digits=DIGITS)
    return cache, Path(task.warm_start(cache / "warm-start", seed=seed, digits=DIGITS))


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@torch.no_grad()
def held_out_accuracy(model: Any, tokenizer: Any, problems: list[dict[str, str]]) -> float:
    """Greedy answers to every held-out problem, exact match: the same judge for both."""
    model.eval()
    right = 0
    for start in range(0, len(problems), 100):
        chunk = problems[start : start + 100]
        inputs = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :])
        right += sum(task.reward(a, p["label"]) for a, p in zip(answers, chunk, strict=True))
    return right / len(problems)


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def run_trl(cache: Path, warm_start: Path, seed: int, steps: int, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    started = time.perf_counter()
    model, tokenizer = load(warm_start)
    evals = read_jsonl(cache / "eval.jsonl")
    before = held_out_accuracy(model, tokenizer, evals)

    def exact_answer(prompts: list[str], completions: list[str], label: list[str], **_: Any):
        return [task.reward(c, lab) for c, lab in zip(completions, label, strict=True)]

    args = GRPOConfig(
        output_dir=str(work / "trl"),
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=GROUP * PROMPTS_PER_STEP,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=GRAD_CLIP,
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 4),
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_answer,
        args=args,
        train_dataset=Dataset.from_list(read_jsonl(cache / "train.jsonl")),
        processing_class=tokenizer,
    )
    setup = time.perf_counter() - started
    began = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - began
    return {
        "system": "TRL GRPOTrainer",
        "seed": seed,
        "startup_seconds": setup,
        "loop_seconds": train_seconds,
        "samples": steps * GROUP * PROMPTS_PER_STEP,
        "before": before,
        "after": held_out_accuracy(trainer.model, tokenizer, evals),
        "own_after": None,
    }


def run_miles(cache: Path, seed: int, steps: int, work: Path) -> dict[str, Any]:
    run_id = f"bench-vs-trl-s{seed}"
    command = [sys.executable, "-m", "miles.cli", "run", str(RECIPE), "--quiet"]
    command += ["--run-id", run_id]
    settings = [
        f"run.seed={seed}",
        f"run.steps={steps}",
        f"coordinator.eval_every={steps}",
        f"run.output_dir='{work}'",
        "buffer.max_staleness=0",
    ]
    command += [arg for setting in settings for arg in ("--set", setting)]
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL", "RAY_ADDRESS")}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    total = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"miles run failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    summary = json.loads((work / run_id / "summary.json").read_text())
    model, tokenizer = load(work / run_id / "final")
    evals = read_jsonl(cache / "eval.jsonl")
    return {
        "system": "miles",
        "seed": seed,
        "startup_seconds": total - summary["wall_seconds"],
        "loop_seconds": summary["wall_seconds"],
        "samples": round(summary["samples_per_second"] * summary["wall_seconds"]),
        "before": summary["accuracy_before"],
        "after": held_out_accuracy(model, tokenizer, evals),
        "own_after": summary["accuracy_after"],
        # Where a step's time goes: the trainer's phases and each service's busy seconds.
        "trainer_seconds_per_step": {
            phase: seconds / steps for phase, seconds in summary["trainer_seconds_by_phase"].items()
        },
        "services": summary["services"],
    }


def mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.mean(float(row[key]) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_vs_trl.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="miles-bench-vs-trl-") as tmp:
        for seed in args.seeds:
            cache, warm_start = prepare(seed)
            for system in ("trl", "miles"):
                work = Path(tmp) / f"{system}-s{seed}"
                work.mkdir()
                if system == "trl":
                    row = run_trl(cache, warm_start, seed, args.steps, work)
                else:
                    row = run_miles(cache, seed, args.steps, work)
                row["samples_per_second"] = row["samples"] / row["loop_seconds"]
                rows.append(row)
                print(
                    f"  {row['system']} seed {seed}: {row['samples_per_second']:.1f} samples/s, "
                    f"held-out {row['before']:.3f} -> {row['after']:.3f}",
                    flush=True,
                )

    table = []
    for system in ("TRL GRPOTrainer", "miles"):
        mine = [row for row in rows if row["system"] == system]
        table.append(
            {
                "system": system,
                "samples_per_second": mean(mine, "samples_per_second"),
                "startup_seconds": mean(mine, "startup_seconds"),
                "loop_seconds": mean(mine, "loop_seconds"),
                "before": mean(mine, "before"),
                "after": mean(mine, "after"),
            }
        )
    base = table[0]
    print(f"\n{args.steps} steps x {GROUP * PROMPTS_PER_STEP} samples, seeds {args.seeds}")
    print("| system | samples/s | / TRL | loop s | start-up s | held-out before -> after |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| {row['system']} | {row['samples_per_second']:.1f} | "
            f"{row['samples_per_second'] / base['samples_per_second']:.2f} | "
            f"{row['loop_seconds']:.1f} | {row['startup_seconds']:.1f} | "
            f"{row['before']:.3f} -> {row['after']:.3f} |"
        )
    own = [row["own_after"] for row in rows if row["own_after"] is not None]
    if own:
        print(f"miles' own held-out evaluation after training: {statistics.mean(own):.3f}")
    for row in rows:
        if row["system"] == "miles":
            phases = ", ".join(
                f"{phase} {seconds:.3f}"
                for phase, seconds in row["trainer_seconds_per_step"].items()
            )
            print(f"miles seed {row['seed']}, trainer seconds per step: {phases}")
            print(f"miles seed {row['seed']}, services: {json.dumps(row['services'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "rows": rows, "table": table}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
