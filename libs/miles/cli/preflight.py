"""What `miles run` checks before it starts a server or a service: the model directory, the
tokenizer, the dataset files and their columns, the reward on a real row. Every problem is one
line that says what to fix; `miles run` prints them all and exits 2, so a mistake costs a
second instead of a crash-looping service.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from miles import models
from miles.config import DPO, HFRewardModel, MilesConfig
from miles.data import DataError, PromptSet, load_preferences, load_prompts
from miles.events import Sample
from miles.recipe import Recipe
from miles.scoring import Limits, from_recipe, score_samples


class PreflightFailed(Exception):
    """The run cannot start; ``problems`` are its one-line reasons."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def attempt(self, check: Callable[[], Any]) -> Any:
        """``check()``, or None with its error recorded when it raises one a user can fix."""
        try:
            return check()
        except (models.ModelError, DataError, ValueError, OSError) as exc:
            self.problems.append(one_line(exc))
            return None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check(config: MilesConfig, recipe: Recipe) -> list[str]:
    """Raise ``PreflightFailed`` with every problem found; else return what was checked."""
    report = Report()
    tokenizer = check_model(config, report)
    prompts = check_data(config, recipe, tokenizer, report)
    check_reward_models(config, report)
    check_reward(config, recipe, prompts, report)
    if report.problems:
        raise PreflightFailed(report.problems)
    return report.notes


def check_model(config: MilesConfig, report: Report) -> Any:
    model = config.model
    if model.path is None:
        report.problems.append(
            "model.path is not set: point it at a Hugging Face model directory "
            "(--set model.path=DIR, or set it in the recipe's @miles.setup)"
        )
        return None
    directory = report.attempt(lambda: models.local_dir(model.path))  # type: ignore[arg-type]
    if directory is None:
        return None
    problems = models.model_problems(directory)
    report.problems += problems
    if not problems:
        report.attempt(lambda: _model_config(directory, model.trust_remote_code))
    tokenizer = report.attempt(lambda: models.load_tokenizer(model))
    if tokenizer is not None:
        report.notes.append(f"model {directory}")
    return tokenizer


def _model_config(directory: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        hint = "" if trust_remote_code else " (custom code needs model.trust_remote_code=true)"
        raise models.ModelError(f"model.path: {directory}: {one_line(exc)}{hint}") from exc


def check_data(
    config: MilesConfig, recipe: Recipe, tokenizer: Any, report: Report
) -> PromptSet | None:
    if isinstance(config.algorithm, DPO):
        pairs = report.attempt(lambda: load_preferences(config, recipe))
        if pairs is not None:
            report.notes.append(f"{len(pairs)} preference pairs")
        return None
    if tokenizer is None and config.model.path is not None:
        return None  # the model's problem is reported; the data needs its tokenizer
    train: PromptSet | None = report.attempt(
        lambda: load_prompts(config, recipe, "train", tokenizer)
    )
    held_out: PromptSet | None = report.attempt(
        lambda: load_prompts(config, recipe, "eval", tokenizer)
    )
    if train is not None:
        dropped = f" ({train.dropped} over data.max_prompt_tokens dropped)" if train.dropped else ""
        report.notes.append(f"{len(train.prompts)} train prompts{dropped}")
    if held_out is not None:
        report.notes.append(
            f"{len(held_out.prompts)} held-out prompts" if held_out.prompts else "no held-out data"
        )
    return train


def check_reward_models(config: MilesConfig, report: Report) -> None:
    """A Hugging Face reward model must be here; an HTTP one is only called once the run
    starts (its server may come up with the run)."""
    for index, model in enumerate(config.reward.models):
        if isinstance(model, HFRewardModel):
            what = f"reward.models[{index}].path"
            directory = report.attempt(functools.partial(models.local_dir, model.path, what))
            if directory is not None:
                report.problems += models.model_problems(directory, what)


def check_reward(
    config: MilesConfig, recipe: Recipe, train: PromptSet | None, report: Report
) -> None:
    scorers = from_recipe(recipe.rewards)
    known = [s.name for s in scorers] + [m.name for m in config.reward.models]
    for name in config.reward.weights:
        if name not in known:
            report.problems.append(
                f"reward.weights names {name!r}, which is no @miles.reward function or reward "
                f"model (known: {', '.join(known)})"
            )
    if train is None or not train.prompts or isinstance(config.algorithm, DPO):
        return
    prompt = train.prompts[0]
    sample = Sample(
        sample_id="preflight/0",
        prompt=prompt.prompt,
        label=prompt.label,
        metadata=prompt.metadata,
        prompt_ids=[],
        response_ids=[],
        response_logprobs=[],
        response_text=str(prompt.label),
        finish_reason="stop",
        policy_version_first=0,
        policy_version_last=0,
    )

    async def score() -> list[dict[str, float]]:
        limits = Limits(1, config.reward.timeout_seconds)
        try:
            return await score_samples([sample], scorers, config.reward.weights, limits)
        finally:
            limits.close()

    values = asyncio.run(score())[0]
    if sample.failed:
        report.problems.append(
            f"reward on the first train row (its label {str(prompt.label)[:40]!r} as the "
            f"completion): {sample.error}"
        )
    else:
        shown = ", ".join(f"{name}={value:g}" for name, value in values.items())
        report.notes.append(f"reward on a train row with its label as the completion: {shown}")
