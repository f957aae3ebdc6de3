"""GPU recipe: Qwen2.5-1.5B-Instruct learns grade-school math (GSM8K-style) with GRPO.

NOT RUN IN CI: it needs GPUs, a local copy of the model and a local JSONL of problems. See
README.md in this directory for the exact commands on one 8-GPU node and on a Ray cluster.

    miles run examples/gsm8k/recipe.py \\
        --set model.path=/models/Qwen2.5-1.5B-Instruct \\
        --set data.train_path=/data/gsm8k/train.jsonl --set data.eval_path=/data/gsm8k/test.jsonl

Each JSONL line is ``{"prompt": "<chat-formatted question>", "label": "<final number>"}``;
``prepare_data.py`` makes them from GSM8K's own JSONL with the model's chat template.
The reward is 1 when the last number in the completion's ``\\boxed{...}`` (or, failing that,
its last number) equals the label, 0 otherwise.
"""

from __future__ import annotations

import re

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

config = miles.MilesConfig(
    run=RunConfig(name="gsm8k-qwen2_5-1_5b", seed=0, steps=200),
    data=DataConfig(eval_size=500),
    rollout=RolloutConfig(
        engine="sglang",
        engines=7,  # 7 engines x TP1, the 8th GPU trains (see README)
        engine_num_gpus=1,
        engine_num_cpus=4,
        sglang_args=["--mem-fraction-static", "0.7", "--dtype", "bfloat16"],
        group_size=8,
        max_new_tokens=512,
        temperature=1.0,
        stop=[],
        tasks_per_fetch=32,
    ),
    algorithm=GRPO(eps_low=0.2, eps_high=0.28, aggregation="token_mean", kl_coef=0.0),
    buffer=BufferConfig(groups_per_batch=64, max_staleness=1),
    trainer=TrainerConfig(
        lr=1e-6, micro_batch_size=8, dtype="bf16", grad_clip=1.0, device="cuda", num_gpus=1
    ),
    coordinator=CoordinatorConfig(eval_every=20, max_groups_in_flight=256),
)

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str | None:
    """The answer a completion commits to: inside its last \\boxed{}, else its last number."""
    boxed = _BOXED.findall(text)
    candidates = _NUMBER.findall(boxed[-1] if boxed else text)
    if not candidates:
        return None
    return candidates[-1].replace(",", "").rstrip(".")


def same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


@miles.dataset
def problems(split: str) -> list[dict[str, str]]:
    """Only used when data.train_path / data.eval_path are unset: tells you to set them."""
    raise ValueError(
        f"set data.{split}_path to a local JSONL of {{'prompt', 'label'}} (see README.md)"
    )


@miles.reward
def correct(sample: miles.Sample) -> float:
    answer = final_number(sample.response_text)
    return float(answer is not None and same_number(answer, sample.label))
