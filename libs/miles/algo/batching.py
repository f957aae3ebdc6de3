"""The buffer's pure logic: which groups to keep, and how kept groups become a training batch."""

from __future__ import annotations

import hashlib
import math

import msgspec
import torch

from miles.algo.advantages import batch_whitened, group_normalized, leave_one_out
from miles.algo.shaping import overlong_penalty
from miles.config import DAPO, Algorithm, BufferConfig
from miles.events import Batch, Sample, ScoredGroup, TrainSample, trained_tokens

FILTER_REASONS = (
    "failed",
    "non_finite_reward",
    "future_version",
    "bad_loss_mask",
    "stale",
    "zero_variance",
)
"""Every reason ``filter_reason`` gives."""
BAD_INPUT = frozenset({"non_finite_reward", "future_version", "bad_loss_mask"})
"""Reasons that mean a producer is broken, not that the group is merely useless: these groups
are dead-lettered for an operator as well as filtered."""


def filter_reason(group: ScoredGroup, trainer_version: int, buffer: BufferConfig) -> str | None:
    """Why a scored group cannot be trained on, or None when it can."""
    valid = [s for s in group.samples if not s.failed]
    if any(not math.isfinite(s.reward) for s in valid):
        return "non_finite_reward"  # the reward service marks these failed: a bad producer
    if len(valid) < 2:
        return "failed"  # fewer than two scored samples: no group baseline
    if group.policy_version > trainer_version:
        return "future_version"  # produced by a policy the trainer never published
    if any(loss_mask_error(s) for s in valid):
        return "bad_loss_mask"  # a custom rollout's mask the trainer could not apply
    if group.policy_version < trainer_version - buffer.max_staleness:
        return "stale"
    if buffer.filter_zero_variance and len({s.reward for s in valid}) == 1:
        return "zero_variance"  # every advantage would be 0: no gradient, only cost
    return None


def loss_mask_error(sample: Sample | TrainSample) -> str | None:
    """What is wrong with a sample's per-token ``loss_mask``, or None: it is empty (every
    response token trained) or one 0/1 per response token."""
    mask, tokens = sample.loss_mask, len(sample.response_ids)
    if mask and len(mask) != tokens:
        return f"{sample.sample_id}: loss_mask has {len(mask)} entries for {tokens} response tokens"
    if any(value not in (0, 1) for value in mask):
        return f"{sample.sample_id}: loss_mask holds values other than 0 and 1"
    return None


def batch_id(task_ids: list[str]) -> str:
    """Stable in the groups it holds, so a rebuilt batch after a restart has the same id."""
    return "b-" + hashlib.sha256("\n".join(sorted(task_ids)).encode()).hexdigest()[:16]


def dispatch_order(task_id: str) -> tuple[int, str]:
    """Task ids sort in the order the coordinator dispatched them (``t9`` before ``t10``)."""
    return len(task_id), task_id


def shaped_reward(sample: Sample, algorithm: Algorithm, max_new_tokens: int) -> float:
    """The reward the advantage sees: the scorer's, plus DAPO's overlong punishment (on the
    policy's own tokens: a long tool output is not the policy's verbosity)."""
    if not isinstance(algorithm, DAPO):
        return sample.reward
    cache = round(algorithm.overlong_cache * max_new_tokens)
    length = trained_tokens(sample)
    return sample.reward + overlong_penalty(
        length, max_new_tokens, cache, algorithm.overlong_penalty
    )


def advantages(
    groups: list[list[Sample]], algorithm: Algorithm, max_new_tokens: int
) -> list[list[float]]:
    """One advantage per sample, by the estimator the algorithm names (``miles.algo.advantages``).

    Groups may differ in size (failed samples are left out), so the group estimators run one
    group at a time, in float64.
    """
    rewards = [
        torch.tensor(
            [shaped_reward(s, algorithm, max_new_tokens) for s in group], dtype=torch.float64
        )
        for group in groups
    ]
    if algorithm.advantage == "group":
        return [group_normalized(r[None], algorithm.std)[0].tolist() for r in rewards]
    if algorithm.advantage == "rloo":
        return [leave_one_out(r[None])[0].tolist() for r in rewards]
    if algorithm.advantage == "gae":  # per token, from the trainer's critic and the reward
        return [[0.0] * len(r) for r in rewards]
    if algorithm.advantage == "pair":  # DPO: +1 marks the chosen response, -1 the rejected
        return [preference_signs(r) for r in rewards]
    flat = torch.cat(rewards)
    lengths = torch.tensor([trained_tokens(s) for group in groups for s in group])
    baseline = getattr(algorithm, "baseline", True)
    means = torch.cat([r.mean().expand_as(r) for r in rewards]) if baseline else None
    whitened = batch_whitened(flat, lengths, means).tolist()
    out, start = [], 0
    for group in groups:
        out.append(whitened[start : start + len(group)])
        start += len(group)
    return out


def preference_signs(rewards: torch.Tensor) -> list[float]:
    """A preference pair as the coordinator scores it: chosen (1) first, rejected (0) second."""
    if rewards.shape != (2,) or not rewards[0] > rewards[1]:
        raise ValueError(f"a preference group is (chosen, rejected) rewarded 1, 0; got {rewards}")
    return [1.0, -1.0]


def make_batch(
    run_id: str, groups: list[ScoredGroup], algorithm: Algorithm, max_new_tokens: int
) -> Batch:
    """A batch in canonical order: the same groups make the same batch, bit for bit."""
    groups = sorted(groups, key=lambda group: dispatch_order(group.task_id))
    valid = [[s for s in group.samples if not s.failed] for group in groups]
    samples: list[TrainSample] = [
        TrainSample(
            sample_id=s.sample_id,
            prompt_ids=s.prompt_ids,
            response_ids=s.response_ids,
            response_logprobs=s.response_logprobs,
            advantage=float(advantage),
            reward=s.reward,
            policy_version=s.policy_version_first,
            loss_mask=s.loss_mask,
            turns=[msgspec.structs.replace(turn, text="") for turn in s.turns],
        )
        for group, group_advantages in zip(
            valid, advantages(valid, algorithm, max_new_tokens), strict=True
        )
        for s, advantage in zip(group, group_advantages, strict=True)
    ]
    task_ids = [g.task_id for g in groups]
    return Batch(
        run_id=run_id,
        policy_version=min(g.policy_version for g in groups),
        batch_id=batch_id(task_ids),
        task_ids=task_ids,
        samples=samples,
    )
