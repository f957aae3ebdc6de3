"""The algorithm's micro-batch loss on vocab-parallel logits, term for term TorchTrainer's.

With tensor parallelism each rank holds the logits of ``V / tp`` vocabulary entries.
``tensor_parallel.vocab_parallel_cross_entropy`` returns ``logsumexp(all logits) - logit[target]``
with the max and the sum all-reduced over the tensor-parallel group, i.e. ``-log p(target)``, and
its backward is the exact softmax gradient of each rank's slice; the full ``[N, T, V]`` logits are
never gathered.

The loss itself is ``miles.trainer.objective.policy_objective``, the torch backend's too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from torch import Tensor

from miles.algo import share
from miles.config.algorithm import PolicyGradient
from miles.trainer.batch import TensorBatch
from miles.trainer.objective import METRICS, policy_objective, weighted_values

__all__ = ["METRICS", "MicroBatchLoss", "policy_micro_batch_loss", "vocab_parallel_logprobs"]


def vocab_parallel_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """``[N, T - 1]`` float32 log p(input_ids[:, t + 1] | ...) from ``[N, T, V / tp]`` logits."""
    # fp32 softmax whatever the logits' dtype; contiguous because the cross entropy views its
    # input as 2-D (and works in place on this copy, never on the model's output).
    shifted = logits[:, :-1].float().contiguous()
    return -tensor_parallel.vocab_parallel_cross_entropy(shifted, input_ids[:, 1:].contiguous())


@dataclass(frozen=True)
class MicroBatchLoss:
    loss: Tensor
    """The micro-batch loss times its share of the batch: backward of the sum is the batch's."""
    weighted: Tensor
    """``METRICS`` as float64 (``objective.weighted_values``): summed over micro-batches and
    ranks they give the batch's values, ``MAX_METRICS`` combined by max instead."""


def policy_micro_batch_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    micro: TensorBatch,
    batch: TensorBatch,
    algorithm: PolicyGradient,
) -> MicroBatchLoss:
    """``micro`` is one micro-batch of ``batch``; shares are of the whole batch (every rank)."""
    token_share = micro.num_tokens / batch.num_tokens
    weight = share(
        algorithm.aggregation,
        micro.num_tokens,
        batch.num_tokens,
        micro.num_samples,
        batch.num_samples,
    )
    objective = policy_objective(logprobs, ref_logprobs, None, micro, algorithm)
    values = weighted_values(objective, weight, token_share)
    return MicroBatchLoss(objective.loss * weight, torch.tensor(values, dtype=torch.float64))
