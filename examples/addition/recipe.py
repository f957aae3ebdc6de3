"""Demo recipe: a tiny Llama learns to carry in 2-digit addition with GRPO on a CPU.

    miles run examples/addition/recipe.py
    miles run examples/addition/recipe.py --set trainer.lr=0      # the control: nothing learns
    miles run examples/addition/recipe.py --set algorithm.name=dpo  # offline DPO on pairs

``prepare`` writes the train/held-out JSONL files and a supervised warm start on a sloppy
teacher that often forgets carries (cached under runs/cache, see task.py), so RL starts from a
model that is sometimes right. The reward is exact match.
"""

from __future__ import annotations

import os
from pathlib import Path

import task

import miles
from miles.config import (
    GRPO,
    BufferConfig,
    CoordinatorConfig,
    DataConfig,
    RolloutConfig,
    RunConfig,
    TrainerConfig,
)

DIGITS = 2
CACHE = Path(
    os.environ.get("MILES_CACHE_DIR", Path(__file__).resolve().parents[2] / "runs" / "cache")
)

config = miles.MilesConfig(
    run=RunConfig(name="addition", seed=0, steps=40),
    data=DataConfig(eval_size=200),
    rollout=RolloutConfig(
        group_size=8, max_new_tokens=DIGITS + 2, temperature=1.0, tasks_per_fetch=8
    ),
    algorithm=GRPO(eps_low=0.2, eps_high=0.28, aggregation="token_mean", kl_coef=0.0),
    buffer=BufferConfig(groups_per_batch=8, max_staleness=0),
    trainer=TrainerConfig(lr=3e-4, micro_batch_size=64, grad_clip=1.0),
    coordinator=CoordinatorConfig(eval_every=10),
)


@miles.setup
def prepare(config: miles.MilesConfig) -> miles.MilesConfig:
    cache = CACHE / f"addition-d{DIGITS}-s{config.run.seed}"
    task.write_splits(
        cache, train=5_000, eval=config.data.eval_size, seed=config.run.seed, digits=DIGITS
    )
    model_dir = task.warm_start(cache / "warm-start", seed=config.run.seed, digits=DIGITS)
    config.model.path = Path(model_dir).resolve()
    # DPO learns from preference pairs (right answer over the sloppy teacher's), the RL
    # algorithms from prompts and the reward.
    train = "train_pairs.jsonl" if config.algorithm.name == "dpo" else "train.jsonl"
    config.data.train_path = (cache / train).resolve()
    config.data.eval_path = (cache / "eval.jsonl").resolve()
    return config


@miles.reward
def exact_answer(sample: miles.Sample) -> float:
    return task.reward(sample.response_text, sample.label)
