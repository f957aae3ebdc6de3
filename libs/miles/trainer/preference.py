"""DPO's gradient on a batch of preference pairs, over micro-batches (with RPO's NLL term on
the chosen response when ``nll_coef`` > 0).

The buffer lays a DPO batch out as pairs: rows ``2i`` (chosen, advantage +1) and ``2i + 1``
(rejected, advantage -1) answer the same prompt. A pair's loss needs both of its rows, so
micro-batches hold whole pairs; each contributes its pairs' mean loss times its share of the
batch's pairs, so the summed gradient is that of the mean over every pair of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from miles.algo import dpo
from miles.config import DPO
from miles.trainer.batch import TensorBatch, split, token_logprobs

METRICS = (
    "loss",
    "dpo_chosen_nll",
    "dpo_chosen_reward",
    "dpo_rejected_reward",
    "dpo_margin",
    "dpo_accuracy",
)


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:
    """``[N]``: log pi(response | prompt), the sum of the response tokens' logprobs."""
    return (logprobs * mask).sum(dim=-1)


def check_pairs(batch: TensorBatch) -> None:
    signs = batch.advantages
    paired = (
        signs.dim() == 1
        and batch.num_samples % 2 == 0
        and bool((signs[0::2] == 1).all())
        and bool((signs[1::2] == -1).all())
    )
    if not paired:
        raise ValueError(
            "algorithm.name='dpo' trains on (chosen, rejected) pairs that the coordinator feeds "
            f"from a preference dataset; this batch is not one (advantages {signs.tolist()})"
        )


def dpo_gradients(
    model: nn.Module,
    reference: nn.Module,
    batch: TensorBatch,
    algorithm: DPO,
    micro_batch_size: int,
    autocast: Callable[[], AbstractContextManager[None]],
) -> dict[str, float]:
    """Backward of DPO's mean loss over ``batch``'s pairs; returns ``METRICS``."""
    check_pairs(batch)
    pairs = batch.num_samples // 2
    rows = max(2, micro_batch_size - micro_batch_size % 2)  # whole pairs per micro-batch
    totals = dict.fromkeys(METRICS, 0.0)
    for micro in split(batch, rows):
        mask = micro.loss_mask
        with autocast():
            policy = sequence_logprobs(token_logprobs(model, micro), mask)
        with torch.no_grad(), autocast():
            ref = sequence_logprobs(token_logprobs(reference, micro), mask)
        loss, stats = dpo(
            policy[0::2],
            policy[1::2],
            ref[0::2],
            ref[1::2],
            algorithm.beta,
            algorithm.label_smoothing,
        )
        nll = -policy[0::2] / mask[0::2].sum(dim=-1)  # per token of the chosen response
        loss = loss + algorithm.nll_coef * nll  # 0: plain DPO
        share = micro.num_samples / 2 / pairs
        (loss.mean() * share).backward()
        values = (
            loss.mean().item(),
            nll.mean().item(),
            stats.chosen_reward,
            stats.rejected_reward,
            stats.margin,
            stats.accuracy,
        )
        for name, value in zip(METRICS, values, strict=True):
            totals[name] += value * share
    return totals
