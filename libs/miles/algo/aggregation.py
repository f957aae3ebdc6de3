"""Reducing a ``[N, T]`` per-token loss to the scalar a backward starts from.

``mask`` is 1 on the tokens the policy wrote (response tokens) and 0 on prompt and padding. A
batch is split into micro-batches for memory; each micro-batch's loss is weighted by
``share`` so that the summed gradient equals one backward of the whole batch.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Aggregation = Literal[
    "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
]


def aggregate(values: Tensor, mask: Tensor, mode: Aggregation, norm_tokens: int = 1) -> Tensor:
    """One number from per-token ``values``.

    * ``token_mean``: ``sum(values * mask) / sum(mask)``, every token of the batch weighs the
      same, so long answers are not diluted (DAPO, arXiv:2503.14476, sec. 3.3, eq. 12).
    * ``seq_mean_token_mean``: each sequence's mean, then the mean over sequences (GRPO,
      arXiv:2402.03300, eq. 3: ``1/G sum_i 1/|o_i| sum_t``).
    * ``seq_mean_token_sum``: each sequence's sum (its log-likelihood for a REINFORCE loss),
      then the mean over sequences (RLOO, arXiv:2402.14740, eq. 6).
    * ``seq_mean_token_sum_norm``: the same divided by one constant ``norm_tokens`` (Dr.GRPO,
      arXiv:2503.20783, sec. 3.1: the generation budget), so no sequence's length scales its
      weight.

    A sequence with no masked token counts as no sequence (it has no mean).
    """
    masked = values * mask
    if mode == "token_mean":
        return masked.sum() / mask.sum()
    tokens = mask.sum(dim=-1)
    present = (tokens > 0).to(values.dtype)
    if mode == "seq_mean_token_mean":
        per_sequence = masked.sum(dim=-1) / tokens.clamp(min=1)
    else:
        per_sequence = masked.sum(dim=-1)
    loss = (per_sequence * present).sum() / present.sum()
    if mode == "seq_mean_token_sum_norm":
        loss = loss / norm_tokens
    return loss


def share(mode: Aggregation, micro_tokens: int, batch_tokens: int, micro: int, batch: int) -> float:
    """The weight of a micro-batch's aggregate in the batch's: its share of response tokens for
    ``token_mean``, of sequences for the others (each a mean over sequences)."""
    if mode == "token_mean":
        return micro_tokens / batch_tokens
    return micro / batch
