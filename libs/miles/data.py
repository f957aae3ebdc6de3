"""Datasets: a JSONL file or the recipe's iterable, of prompts ``{"prompt": ..., "label": ...}``
or, for DPO, of preference pairs ``{"prompt": ..., "chosen": ..., "rejected": ...}``."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from miles.config import MilesConfig
from miles.recipe import Recipe


class Prompt(msgspec.Struct):
    prompt: str
    label: str = ""


class Preference(msgspec.Struct):
    """A prompt with a preferred and a dispreferred completion (DPO's y_w and y_l)."""

    prompt: str
    chosen: str
    rejected: str


PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def prompt(row: object, where: str) -> Prompt:
    """One prompt row (the label stringified), or a one-line error naming ``where``."""
    if not isinstance(row, dict) or "prompt" not in row:
        raise ValueError(f"{where}: expected {{'prompt': ..., 'label': ...}}")
    return Prompt(prompt=str(row["prompt"]), label=str(row.get("label", "")))


def preference(row: object, where: str) -> Preference:
    """One preference row, or a one-line error naming ``where`` and what is missing."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in PREFERENCE_KEYS):
        raise ValueError(
            f"{where}: a DPO row needs the string fields 'prompt', 'chosen' and 'rejected'"
        )
    return Preference(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])


def rows(config: MilesConfig, recipe: Recipe, split: str) -> list[tuple[str, object]]:
    """The split's rows, each with where it came from (``file:line``, or the dataset's index):
    ``data.<split>_path`` (JSONL) or the recipe's ``@miles.dataset``."""
    path = config.data.train_path if split == "train" else config.data.eval_path
    if path is not None:
        found: list[tuple[str, object]] = []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if line.strip():
                try:
                    found.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        return found
    if recipe.dataset is not None:
        return [(f"@miles.dataset row {i}", row) for i, row in enumerate(recipe.dataset(split))]
    raise ValueError(f"no {split} data: set data.{split}_path or add a @miles.dataset function")


def load_preferences(config: MilesConfig, recipe: Recipe) -> list[Preference]:
    """The train split as preference pairs (DPO)."""
    pairs = [preference(row, where) for where, row in rows(config, recipe, "train")]
    if not pairs:
        raise ValueError("the train dataset is empty")
    return pairs


def load_prompts(config: MilesConfig, recipe: Recipe, split: str) -> list[Prompt]:
    found = rows(config, recipe, split)
    if split == "eval":
        found = found[: config.data.eval_size]
    prompts = [prompt(row, where) for where, row in found]
    if not prompts:
        raise ValueError(f"the {split} dataset is empty")
    return prompts
