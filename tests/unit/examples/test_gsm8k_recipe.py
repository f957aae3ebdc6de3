"""The GPU recipe's reward (the recipe itself needs GPUs and is not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

import miles
from miles.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[3] / "examples" / "gsm8k" / "recipe.py"


def _sample(text: str, label: str) -> miles.Sample:
    return miles.Sample(
        sample_id="t0/0",
        prompt="q",
        label=label,
        prompt_ids=[1],
        response_ids=[2],
        response_logprobs=[-0.1],
        response_text=text,
        finish_reason="stop",
        policy_version_first=0,
        policy_version_last=0,
    )


@pytest.mark.parametrize(
    ("text", "label", "reward"),
    [
        ("3 + 4 = 7, so \\boxed{7}.", "7", 1.0),
        ("The total is \\boxed{1,234}", "1234", 1.0),
        ("first 12, then \\boxed{18} and finally 20", "18", 1.0),  # boxed wins over the last
        ("so the answer is 72.", "72", 1.0),  # no box: the last number
        ("\\boxed{7.0}", "7", 1.0),
        ("\\boxed{8}", "7", 0.0),
        ("I do not know", "7", 0.0),
    ],
)
def test_reward(text: str, label: str, reward: float) -> None:
    recipe = load_recipe(RECIPE)
    assert recipe.rewards["correct"](_sample(text, label)) == reward
    assert recipe.config.rollout.engine == "sglang"
