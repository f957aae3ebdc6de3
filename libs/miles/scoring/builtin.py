"""Ready-made rewards for the common cases, each a factory returning a fresh ``@miles.reward``
function (so a recipe can use one twice under two names, and tagging never touches a shared
object):

    accuracy = miles.rewards.math_answer()           # \\boxed{} or #### answer == label
    formatted = miles.rewards.format_regex(r"^<think>.*</think>")
    exact = miles.rewards.exact_match()

The recipe's variable name is not what names it: ``name`` is (metrics, ``reward.weights``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from miles.events import Sample
from miles.recipe import reward

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """What a completion commits to: its last ``\\boxed{...}``, else what follows its last
    ``####`` (GSM8K's convention), else its last number; None when it has none of them."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same_answer(answer: str, label: Any) -> bool:
    """Numerically equal when both read as numbers (``1,000`` = ``1000.0``), else equal text."""
    text = str(label).strip()
    target = final_answer(text) if ("####" in text or "\\boxed" in text) else text
    if target is None:
        return False
    try:
        return abs(_number(answer) - _number(target)) < 1e-6
    except ValueError:
        return answer.strip() == target.strip()


def _number(text: str) -> float:
    return float(text.replace(",", "").replace("$", "").strip().rstrip("."))


def _named(name: str, fn: Callable[[Sample], float]) -> Callable[[Sample], float]:
    fn.__name__ = fn.__qualname__ = name
    return reward(fn)


def exact_match(name: str = "exact_match", strip: bool = True) -> Callable[[Sample], float]:
    """1.0 when the completion is the label's text (both stripped unless ``strip=False``)."""

    def score(sample: Sample) -> float:
        text, label = sample.response_text, str(sample.label)
        return float(text.strip() == label.strip() if strip else text == label)

    return _named(name, score)


def math_answer(name: str = "math_answer") -> Callable[[Sample], float]:
    """1.0 when the completion's final answer (``final_answer``) equals the label's."""

    def score(sample: Sample) -> float:
        answer = final_answer(sample.response_text)
        return float(answer is not None and same_answer(answer, sample.label))

    return _named(name, score)


def format_regex(pattern: str, name: str = "format") -> Callable[[Sample], float]:
    """1.0 when the completion matches ``pattern`` (``re.search``, DOTALL)."""
    compiled = re.compile(pattern, re.DOTALL)

    def score(sample: Sample) -> float:
        return float(compiled.search(sample.response_text) is not None)

    return _named(name, score)
