"""Reward shaping applied before advantages are computed."""

from __future__ import annotations


def overlong_penalty(length: int, max_tokens: int, cache_tokens: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, sec. 3.4, eq. 13),
    added to the reward of a response of ``length`` tokens with ``L_max = max_tokens`` and
    ``L_cache = cache_tokens``: 0 up to ``L_max - L_cache``, then falling linearly to
    ``-penalty`` at ``L_max`` (and beyond), so truncated answers are discouraged gently rather
    than scored as wrong. ``cache_tokens = 0`` turns it off."""
    if cache_tokens <= 0:
        return 0.0
    expected = max_tokens - cache_tokens
    if length <= expected:
        return 0.0
    if length <= max_tokens:
        return penalty * (expected - length) / cache_tokens
    return -penalty
