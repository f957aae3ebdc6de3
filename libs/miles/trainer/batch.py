"""Padded tensors for a list of ``TrainSample``s, and the per-token logprobs of a model on them.

Layout, for a sample with ``P`` prompt and ``R`` response tokens, right-padded to ``T``:
``input_ids[:P + R] = prompt_ids + response_ids``. Position ``t`` of the ``[N, T - 1]`` tensors
scores ``input_ids[t + 1]`` given ``input_ids[:t + 1]``, so the response occupies positions
``P - 1 .. P + R - 2``; ``loss_mask`` is 1 there and ``engine_logprobs`` holds the engine's
``response_logprobs`` there. Right padding keeps real tokens at positions ``0 .. P + R - 1``, so a
causal model sees the same prefix and position ids as the engine did.

A multi-turn sample's response holds tokens the policy did not write (a tool's output), which
its own ``loss_mask`` zeroes: ``loss_mask`` here is that mask on the response span, and it is
the single mask every loss, KL, entropy, critic and aggregation reads, so those tokens condition
the later ones as inputs but receive no gradient, count in no mean, and hold no reward.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from miles.algo import entropy_from_logits
from miles.algo.batching import loss_mask_error
from miles.events import TrainSample

FULL_WIDTH = frozenset({"input_ids", "attention_mask"})
"""The ``[N, T]`` fields; the other per-token ones are ``[N, T - 1]``, one per prediction."""


@dataclass(frozen=True)
class TensorBatch:
    input_ids: Tensor
    """[N, T] int64, prompt then response, right-padded."""
    attention_mask: Tensor
    """[N, T] int64, 1 on real tokens."""
    loss_mask: Tensor
    """[N, T - 1] float32, 1 where the next token is a response token the policy wrote (0 on
    prompt, padding, and a multi-turn sample's tool or environment tokens)."""
    engine_logprobs: Tensor
    """[N, T - 1] float32, the sampling engine's log p of the next token where ``loss_mask``
    is 1: the behaviour policy (0 elsewhere)."""
    advantages: Tensor
    """[N] float32, one per sample; or [N, T - 1], one per token (GAE from a critic)."""
    rewards: Tensor | None = None
    """[N] float32, each sample's reward (the critic's regression target is built from it)."""
    trainer_logprobs: Tensor | None = None
    """[N, T - 1] float32, the trainer's log p before the batch's first update, when it takes
    several (``algorithm.ppo_epochs`` or ``mini_batches`` > 1): pi_old of every update."""
    old_values: Tensor | None = None
    """[N, T - 1] float32, the critic's values before the batch's first update (PPO)."""
    returns: Tensor | None = None
    """[N, T - 1] float32, the critic's regression targets, GAE advantage + old value (PPO)."""
    token_rewards: Tensor | None = None
    """[N, T - 1] float32, per-token rewards: the outcome on the last response token minus the
    KL penalty on every one (``algorithm.kl_in = "reward"``)."""

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> TensorBatch:
        return self.map(lambda _, t: t.to(device, non_blocking=True))

    def map(self, function: Callable[[str, Tensor], Tensor]) -> TensorBatch:
        """Apply ``function(name, tensor)`` to every tensor present (optional ones may be None)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        changed = {name: function(name, t) for name, t in fields.items() if t is not None}
        return dataclasses.replace(self, **changed)

    def rows(self, rows: slice, width: int | None = None) -> TensorBatch:
        """Samples ``rows``, trimmed to ``width`` tokens: ``[N, T]`` tensors to ``width``,
        ``[N, T - 1]`` ones to ``width - 1``, ``[N]`` ones only sliced."""

        def take(name: str, tensor: Tensor) -> Tensor:
            if tensor.dim() == 1 or width is None:
                return tensor[rows]
            return tensor[rows, : width if name in FULL_WIDTH else width - 1]

        return self.map(take)

    @property
    def num_tokens(self) -> int:
        """Response tokens, the ones the loss sees."""
        return int(self.loss_mask.sum().item())


def collate(samples: list[TrainSample], pad_id: int) -> TensorBatch:
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    n, width = len(samples), max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width - 1), dtype=torch.float32)
    engine_logprobs = torch.zeros((n, width - 1), dtype=torch.float32)
    for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
        start = len(sample.prompt_ids) - 1  # the position whose next token is response token 0
        input_ids[row, :length] = torch.tensor(sample.prompt_ids + sample.response_ids)
        attention_mask[row, :length] = 1
        response_mask = response_loss_mask(sample)
        loss_mask[row, start : length - 1] = response_mask
        # Zeroed off the mask: what an engine reported for a token it did not sample (a tool's
        # output) must not reach a ratio exp(logp - old) even where the mask multiplies it away.
        engine_logprobs[row, start : length - 1] = torch.where(
            response_mask > 0, torch.tensor(sample.response_logprobs), 0.0
        )
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    return TensorBatch(input_ids, attention_mask, loss_mask, engine_logprobs, advantages, rewards)


def response_loss_mask(sample: TrainSample) -> Tensor:
    """``[R]`` float32: the sample's per-token ``loss_mask`` (all ones when it has none)."""
    error = loss_mask_error(sample)
    if error is not None:
        raise ValueError(error)
    if not sample.loss_mask:
        return torch.ones(len(sample.response_ids), dtype=torch.float32)
    return torch.tensor(sample.loss_mask, dtype=torch.float32)


def split(batch: TensorBatch, micro_batch_size: int) -> list[TensorBatch]:
    """Consecutive chunks of ``micro_batch_size`` samples, each trimmed to its longest sample."""
    chunks = []
    for start in range(0, batch.num_samples, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        width = int(batch.attention_mask[rows].sum(dim=-1).max().item())
        chunks.append(batch.rows(rows, width))
    return chunks


def per_position(
    batch: TensorBatch, micro_batch_size: int, function: Callable[[TensorBatch], Tensor]
) -> Tensor:
    """``[N, T - 1]``: ``function`` of each micro-batch (``[n, t - 1]``, trimmed), put back in
    the batch's layout, 0 off the response (no gradient: for pi_old and the old values)."""
    full = torch.zeros_like(batch.loss_mask)
    start = 0
    with torch.no_grad():
        for micro in split(batch, micro_batch_size):
            values = function(micro)
            full[start : start + micro.num_samples, : values.shape[1]] = values
            start += micro.num_samples
    return full * batch.loss_mask


def parts(batch: TensorBatch, count: int) -> list[TensorBatch]:
    """``count`` consecutive parts of nearly equal size (PPO's mini-batches), in order: the
    same batch always splits the same way, so a resumed step repeats it bit for bit."""
    n = batch.num_samples
    bounds = [n * i // count for i in range(count + 1)]
    return [batch.rows(slice(a, b)) for a, b in itertools.pairwise(bounds) if b > a]


def token_logprobs(model: nn.Module, batch: TensorBatch) -> Tensor:
    """``[N, T - 1]`` float32: log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) under ``model``."""
    return token_logprobs_and_entropy(model, batch, entropy=False)[0]


def token_logprobs_and_entropy(
    model: nn.Module, batch: TensorBatch, entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """The logprobs of ``token_logprobs`` and, when asked, the policy's entropy at each position.

    ``log_softmax(x)[y] = x[y] - logsumexp(x)``: gathering the target logit and subtracting the
    logsumexp gives the same number as ``log_softmax(...).gather(...)`` without keeping a second
    ``[N, T, V]`` tensor of log-probabilities alive for backward (the entropy needs it).
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float()  # fp32 softmax even when the forward ran in bf16
    targets = batch.input_ids[:, 1:].unsqueeze(-1)
    logprobs: Tensor = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logprobs, entropy_from_logits(logits) if entropy else None
