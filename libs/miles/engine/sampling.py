"""Next-token sampling for one sequence: temperature, top-k, top-p, and the RL logprob.

The filtering order (temperature, then top-k, then top-p on the scaled distribution) and the
top-p cut-off rule follow SGLang's ``sampler.py`` so that the CPU engine and an SGLang backend
draw from the same distribution for the same ``SamplingParams``.
"""

from __future__ import annotations

import torch

from miles.engine.protocol import SamplingParams


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of a 1-D tensor, the rest -inf; ``top_k <= 0`` keeps all.

    Exactly ``top_k`` tokens survive even when logits tie at the boundary.
    """
    if top_k <= 0 or top_k >= logits.numel():
        return logits
    top = torch.topk(logits, top_k)
    return torch.full_like(logits, float("-inf")).scatter(0, top.indices, top.values)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``.

    A token is dropped when the mass of the tokens strictly more likely than it already exceeds
    ``top_p`` (SGLang's ``(cumsum - p) > top_p``), so the most likely token always survives.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(0, order, mass_before > top_p)
    return logits.masked_fill(drop, float("-inf"))


def sampling_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The logits a token is drawn from: scaled by temperature, then top-k, then top-p filtered."""
    scaled = logits / params.temperature
    return top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[int, float]:
    """Draw one token from a 1-D row of next-token logits; return it with its logprob.

    ``temperature == 0`` is greedy and consumes no randomness. Otherwise the draw uses only the
    request's own ``generator``, so a request's tokens do not depend on its batch neighbours.

    The returned logprob is ``log_softmax(logits)[token]`` of the *raw* logits (temperature 1, no
    top-k/top-p), not of the filtered distribution the token was drawn from. RL wants the policy's
    own probability of the token as the behaviour logprob (the trainer recomputes exactly this
    quantity for importance ratios); it equals the sampling distribution's logprob when rollouts
    use temperature 1 with no filtering, which is the on-policy setting.
    """
    if params.temperature == 0:
        token = int(logits.argmax())
    else:
        probs = sampling_logits(logits, params).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logits.log_softmax(-1)[token])
