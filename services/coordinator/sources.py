"""What the coordinator feeds at each dataset cursor.

For the RL algorithms: a prompt ``Task`` for the rollout service. For offline DPO: the cursor's
preference pair as a ``ScoredGroup`` of two samples, chosen (reward 1) then rejected (reward
0), published straight to the buffer: no generation and no scoring, and from there the same
buffer, batches, manifests and fault tolerance as any group. The id is the cursor either way,
and the publish is deduplicated by it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from miles import events
from miles.config import DPO, MilesConfig
from miles.data import Preference, Prompt, load_preferences, load_prompts, row_at
from miles.recipe import Recipe
from miles.runtime.subjects import Subjects

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Dispatch:
    subject: str
    event: events.Event
    msg_id: str
    task_id: str


class Source(Protocol):
    def at(self, cursor: int, policy_version: int) -> Dispatch: ...


def training_task(
    run_id: str,
    prompts: list[Prompt],
    cursor: int,
    policy_version: int,
    group_size: int,
    seed: int,
    shuffle: bool = False,
) -> events.Task:
    """The task at ``cursor``: epoch after epoch of the dataset, each in its own order when
    ``shuffle`` (a function of the seed and the epoch, so the cursor is all a restart needs);
    its id the cursor (the publish dedupes by it), its sampling seed derived from the run's, so
    a re-sent task generates the same group."""
    prompt = prompts[row_at(cursor, len(prompts), seed, shuffle)]
    return events.Task(
        run_id=run_id,
        policy_version=policy_version,
        task_id=f"t{cursor}",
        prompt=prompt.prompt,
        label=prompt.label,
        metadata=prompt.metadata,
        messages=prompt.messages,
        group_size=group_size,
        seed=seed * 1_000_003 + cursor,
    )


@dataclass(frozen=True)
class Prompts:
    subjects: Subjects
    run_id: str
    prompts: list[Prompt]
    group_size: int
    seed: int
    shuffle: bool = False

    def at(self, cursor: int, policy_version: int) -> Dispatch:
        task = training_task(
            self.run_id,
            self.prompts,
            cursor,
            policy_version,
            self.group_size,
            self.seed,
            self.shuffle,
        )
        return Dispatch(self.subjects.tasks, task, task.task_id, task.task_id)


@dataclass(frozen=True)
class Pairs:
    subjects: Subjects
    run_id: str
    pairs: list[Preference]
    encode: Encode
    eos: list[int]
    seed: int = 0
    shuffle: bool = False

    def at(self, cursor: int, policy_version: int) -> Dispatch:
        pair = self.pairs[row_at(cursor, len(self.pairs), self.seed, self.shuffle)]
        group = preference_group(
            self.run_id, pair, f"t{cursor}", policy_version, self.encode, self.eos
        )
        return Dispatch(self.subjects.scored, group, f"scored/{group.task_id}", group.task_id)


def preference_group(
    run_id: str,
    pair: Preference,
    task_id: str,
    policy_version: int,
    encode: Encode,
    eos: list[int],
) -> events.ScoredGroup:
    """``pair`` as the buffer takes a scored group: the prompt tokenised as the rollout service
    tokenises it, each completion followed by the end-of-sequence token a generation stops on.
    The behaviour logprobs are zeros: DPO reads only the trainer's and the reference's."""
    prompt_ids = encode(pair.prompt)

    def sample(side: str, text: str, reward: float) -> events.Sample:
        response_ids = encode(text) + eos
        return events.Sample(
            sample_id=f"{task_id}/{side}",
            prompt=pair.prompt,
            label=pair.chosen,
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            response_logprobs=[0.0] * len(response_ids),
            response_text=text,
            finish_reason="stop",
            policy_version_first=policy_version,
            policy_version_last=policy_version,
            reward=reward,
        )

    return events.ScoredGroup(
        run_id=run_id,
        policy_version=policy_version,
        task_id=task_id,
        split="train",
        eval_round=-1,
        samples=[sample("chosen", pair.chosen, 1.0), sample("rejected", pair.rejected, 0.0)],
    )


def train_source(
    config: MilesConfig, recipe: Recipe, subjects: Subjects, run_id: str, tokenizer: Any
) -> Source:
    if not isinstance(config.algorithm, DPO):
        prompts = load_prompts(config, recipe, "train", tokenizer).prompts
        return Prompts(
            subjects,
            run_id,
            prompts,
            config.rollout.group_size,
            config.run.seed,
            config.data.shuffle,
        )

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    pairs = load_preferences(config, recipe)
    return Pairs(subjects, run_id, pairs, encode, eos, config.run.seed, config.data.shuffle)
