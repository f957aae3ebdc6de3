"""A chat model learns arithmetic, set up the way the field sets up a task: chat-format rows in
Parquet rendered with the tokenizer's chat template, a batched reward in TRL's signature that
reads a typed column of the dataset, and a built-in format reward weighed next to it.

    miles run examples/chat_math/recipe.py

The model and the problems are the addition demo's (``examples/addition/task.py``: a tiny
Llama, answers least-significant digit first, a warm start on a sloppy teacher), with a chat
template on its tokenizer (``<|user|>57+68=<|end|><|assistant|>``) and the rows in Parquet:
``{"messages": [{"role": "user", "content": "57+68="}], "answer": 125, "carries": 1}``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import miles
from miles.config import (
    GRPO,
    BufferConfig,
    CoordinatorConfig,
    DataConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    TrainerConfig,
)

DIGITS = 2
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MILES_CACHE_DIR", ROOT / "runs" / "cache"))

_spec = importlib.util.spec_from_file_location(
    "miles_example_addition_task", ROOT / "examples" / "addition" / "task.py"
)
assert _spec is not None and _spec.loader is not None
addition = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(addition)

config = miles.MilesConfig(
    run=RunConfig(name="chat-math", seed=0, steps=30),
    data=DataConfig(prompt_key="messages", label_key="answer", eval_size=200),
    rollout=RolloutConfig(group_size=8, max_new_tokens=DIGITS + 2, tasks_per_fetch=8),
    algorithm=GRPO(eps_low=0.2, eps_high=0.28, aggregation="token_mean", kl_coef=0.0),
    reward=RewardConfig(weights={"correct": 1.0, "digits_only": 0.1}),
    buffer=BufferConfig(groups_per_batch=8, max_staleness=0),
    trainer=TrainerConfig(lr=3e-4, micro_batch_size=64),
    coordinator=CoordinatorConfig(eval_every=10, correct_reward=1.0),
)


def chat_rows(problems: list[dict[str, str]]) -> list[dict[str, object]]:
    """The addition problems as chat rows with a typed answer and a metadata column."""
    rows = []
    for problem in problems:
        a, b = (int(x) for x in problem["prompt"].rstrip("=").split("+"))
        carries = sum(
            1
            for x, y in zip(f"{a:0{DIGITS}d}", f"{b:0{DIGITS}d}", strict=True)
            if int(x) + int(y) >= 10
        )
        rows.append(
            {
                "messages": [{"role": "user", "content": problem["prompt"]}],
                "answer": a + b,
                "carries": carries,
            }
        )
    return rows


def write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@miles.setup
def prepare(config: miles.MilesConfig) -> miles.MilesConfig:
    seed = config.run.seed
    cache = CACHE / f"chat-math-d{DIGITS}-s{seed}"
    train = addition.make_problems(5_000, seed, DIGITS, "train")
    held_out = addition.make_problems(config.data.eval_size, seed, DIGITS, "eval")
    config.data.train_path = write_parquet(cache / "train.parquet", chat_rows(train))
    config.data.eval_path = write_parquet(
        cache / f"eval-{config.data.eval_size}.parquet", chat_rows(held_out)
    )
    config.model.path = addition.warm_start(
        cache / "warm-start", seed=seed, digits=DIGITS, chat=True
    )
    return config


@miles.reward
def correct(
    prompts: list[str], completions: list[str], answer: list[int], **columns: object
) -> list[float]:
    """TRL's signature: a group's completions and the dataset's ``answer`` column (an int).
    The model writes the sum least-significant digit first, so it is read reversed."""
    return [
        1.0 if text.strip().isdigit() and int(text.strip()[::-1]) == target else 0.0
        for text, target in zip(completions, answer, strict=True)
    ]


digits_only = miles.rewards.format_regex(r"^\d+$", name="digits_only")
