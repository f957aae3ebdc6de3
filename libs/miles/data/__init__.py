"""Datasets: a split's rows (a file, a saved ``datasets`` directory, or the recipe's
``@miles.dataset``), as prompts for the RL algorithms or as preference pairs for DPO."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from miles.config import MilesConfig
from miles.data.order import row_at
from miles.data.prompts import Prompt, Render, chat_renderer, needs_template, to_prompts
from miles.data.readers import DataError, Row, read_rows
from miles.recipe import Recipe

__all__ = [
    "DataError",
    "Preference",
    "Prompt",
    "PromptSet",
    "load_preferences",
    "load_prompts",
    "preference",
    "row_at",
    "rows",
]

log = logging.getLogger("miles.data")


class Preference(msgspec.Struct):
    """A prompt with a preferred and a dispreferred completion (DPO's y_w and y_l)."""

    prompt: str
    chosen: str
    rejected: str


PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def preference(row: object, where: str) -> Preference:
    """One preference row, or a one-line error naming ``where`` and what is missing."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in PREFERENCE_KEYS):
        raise DataError(
            f"{where}: a DPO row needs the string fields 'prompt', 'chosen' and 'rejected'"
        )
    return Preference(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])


def rows(config: MilesConfig, recipe: Recipe, split: str) -> list[Row]:
    """The split's rows, each with where it came from: ``data.<split>_path`` or the recipe's
    ``@miles.dataset``. No held-out data is fine (no evaluation); no training data is not."""
    path = config.data.train_path if split == "train" else config.data.eval_path
    if path is not None:
        return read_rows(path, split)
    if recipe.dataset is not None:
        return [(f"@miles.dataset row {i}", row) for i, row in enumerate(recipe.dataset(split))]
    if split == "eval":
        return []
    raise DataError("no training data: set data.train_path or add a @miles.dataset function")


def load_preferences(config: MilesConfig, recipe: Recipe) -> list[Preference]:
    """The train split as preference pairs (DPO)."""
    pairs = [preference(row, where) for where, row in rows(config, recipe, "train")]
    if not pairs:
        raise DataError("the train dataset is empty")
    return pairs


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt]
    dropped: int
    """Rows over ``data.max_prompt_tokens``, left out."""


def load_prompts(
    config: MilesConfig, recipe: Recipe, split: str, tokenizer: Any = None
) -> PromptSet:
    """The split's prompts: chat rows rendered with ``tokenizer``'s template, rows longer than
    ``data.max_prompt_tokens`` dropped (counted). The tokenizer is needed for either; without
    one (unit tests, raw prompts, no limit) prompts are used as they are."""
    found = rows(config, recipe, split)
    if split == "eval":
        found = found[: config.data.eval_size]
    render: Render | None = None
    if needs_template(found, config.data):
        if tokenizer is None:
            raise DataError(f"the {split} rows need a chat template, and no tokenizer was given")
        render = chat_renderer(tokenizer)
        if render is None:
            raise DataError(
                f"the {split} rows are chat messages but the tokenizer has no chat_template: "
                "give a tokenizer with one, or plain-text prompts with data.chat_template='off'"
            )
    prompts = to_prompts(found, config.data, render)
    limit, dropped = config.data.max_prompt_tokens, 0
    if limit is not None and tokenizer is not None:
        kept = [
            p for p in prompts if len(tokenizer.encode(p.prompt, add_special_tokens=False)) <= limit
        ]
        dropped = len(prompts) - len(kept)
        prompts = kept
        if dropped:
            log.warning(
                "dropped %d of %d %s rows longer than data.max_prompt_tokens=%d",
                dropped,
                dropped + len(prompts),
                split,
                limit,
            )
    if not prompts and (split == "train" or found):
        raise DataError(
            f"the {split} dataset is empty"
            + (f" after dropping {dropped} rows over data.max_prompt_tokens" if dropped else "")
        )
    return PromptSet(prompts, dropped)
