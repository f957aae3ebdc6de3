"""Demo recipe: a tiny Llama learns to call a calculator tool, with GRPO on a CPU.

    miles run examples/calculator/recipe.py
    miles run examples/calculator/recipe.py --set trainer.lr=0      # the control: nothing learns

A multi-turn ``@miles.rollout``: the model's first turn answers ``"57+68="`` directly or calls
the tool (``"?"``); on a call the calculator's result is appended as a tool turn (``"[521]"``,
masked out of the loss) and the model's second turn writes the final answer. The reward is exact
match of that final answer, so the tool pays and GRPO raises the call rate (``turns`` per role
in steps.jsonl). ``prepare`` writes the data and a supervised warm start that calls the tool
only 20% of the time (cached under runs/cache, see task.py).
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
MAX_RESPONSE_TOKENS = 16
"""The whole response, model and tool turns (the model's context is 32 positions)."""

config = miles.MilesConfig(
    run=RunConfig(name="calculator", seed=0, steps=30),
    data=DataConfig(eval_size=200),
    # max_new_tokens bounds each model turn: an answer of DIGITS + 1 digits and <eos>.
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
    cache = CACHE / f"calculator-d{DIGITS}-s{config.run.seed}"
    task.write_splits(
        cache, train=5_000, eval=config.data.eval_size, seed=config.run.seed, digits=DIGITS
    )
    model_dir = task.warm_start(cache / "warm-start", seed=config.run.seed, digits=DIGITS)
    config.model.path = Path(model_dir).resolve()
    config.data.train_path = (cache / "train.jsonl").resolve()
    config.data.eval_path = (cache / "eval.jsonl").resolve()
    return config


@miles.rollout
async def with_calculator(
    engine: miles.EngineHandle, problem: miles.Task, config: RolloutConfig
) -> list[miles.Sample]:
    """Every sample's first turn in one engine call, then the second turn of those that
    called the tool in another (one batch each keeps a CPU engine busy)."""
    count = 1 if problem.greedy else problem.group_size
    trajectories = [
        engine.trajectory(problem, index, config, max_response_tokens=MAX_RESPONSE_TOKENS)
        for index in range(count)
    ]
    call = engine.tokenizer.convert_tokens_to_ids(task.CALL)
    first = await miles.Trajectory.generate_all(trajectories, stop_token_ids=[call])
    calling = [t for t, text in zip(trajectories, first, strict=True) if text.endswith(task.CALL)]
    for trajectory in calling:
        trajectory.append(task.calculator(problem.prompt), role="tool")
    await miles.Trajectory.generate_all(calling)
    return [trajectory.sample() for trajectory in trajectories]


@miles.reward
def exact_answer(sample: miles.Sample) -> float:
    """The final answer is the model's last turn (a response that ends in a tool turn, cut by
    the length bound, has none); a single completion is all answer."""
    if not sample.turns:
        return task.reward(sample.response_text, sample.label)
    last = sample.turns[-1]
    return task.reward(last.text, sample.label) if last.trained else 0.0
