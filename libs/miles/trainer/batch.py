"""Padded tensors for a list of ``TrainSample``s, and the per-token logprobs of a model on them.

Layout, for a sample with ``P`` prompt and ``R`` response tokens, right-padded to ``T``:
``input_ids[:P + R] = prompt_ids + response_ids``. Position ``t`` of the ``[N, T - 1]`` tensors
scores ``input_ids[t + 1]`` given ``input_ids[:t + 1]``, so the response occupies positions
``P - 1 .. P + R - 2``; ``loss_mask`` is 1 exactly there and ``old_logprobs`` holds the engine's
``response_logprobs`` there. Right padding keeps real tokens at positions ``0 .. P + R - 1``, so a
causal model sees the same prefix and position ids as the engine did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from miles.events import TrainSample


@dataclass(frozen=True)
class TensorBatch:
    input_ids: Tensor
    """[N, T] int64, prompt then response, right-padded."""
    attention_mask: Tensor
    """[N, T] int64, 1 on real tokens."""
    loss_mask: Tensor
    """[N, T - 1] float32, 1 where the next token is a response token."""
    old_logprobs: Tensor
    """[N, T - 1] float32, behaviour-policy log p of the next token where ``loss_mask`` is 1."""
    advantages: Tensor
    """[N] float32, one per sample."""

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> TensorBatch:
        return TensorBatch(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))

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
    old_logprobs = torch.zeros((n, width - 1), dtype=torch.float32)
    for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
        start = len(sample.prompt_ids) - 1  # the position whose next token is response token 0
        input_ids[row, :length] = torch.tensor(sample.prompt_ids + sample.response_ids)
        attention_mask[row, :length] = 1
        loss_mask[row, start : length - 1] = 1.0
        old_logprobs[row, start : length - 1] = torch.tensor(sample.response_logprobs)
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return TensorBatch(input_ids, attention_mask, loss_mask, old_logprobs, advantages)


def split(batch: TensorBatch, micro_batch_size: int) -> list[TensorBatch]:
    """Consecutive chunks of ``micro_batch_size`` samples, each trimmed to its longest sample."""
    chunks = []
    for start in range(0, batch.num_samples, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        width = int(batch.attention_mask[rows].sum(dim=-1).max().item())
        chunks.append(
            TensorBatch(
                input_ids=batch.input_ids[rows, :width],
                attention_mask=batch.attention_mask[rows, :width],
                loss_mask=batch.loss_mask[rows, : width - 1],
                old_logprobs=batch.old_logprobs[rows, : width - 1],
                advantages=batch.advantages[rows],
            )
        )
    return chunks


def token_logprobs(model: nn.Module, batch: TensorBatch) -> Tensor:
    """``[N, T - 1]`` float32: log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) under ``model``.

    ``log_softmax(x)[y] = x[y] - logsumexp(x)``: gathering the target logit and subtracting the
    logsumexp gives the same number as ``log_softmax(...).gather(...)`` without keeping a second
    ``[N, T, V]`` tensor of log-probabilities alive for backward.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float()  # fp32 softmax even when the forward ran in bf16
    targets = batch.input_ids[:, 1:].unsqueeze(-1)
    logprobs: Tensor = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logprobs
