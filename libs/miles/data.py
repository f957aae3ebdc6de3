"""Datasets: a JSONL file or the recipe's iterable, of prompts ``{"prompt": ..., "label": ...}``
or, for DPO, of preference pairs ``{"prompt": ..., "chosen": ..., "rejected": ...}``."""

from __future__ import annotations

import json
from itertools import islice
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


def preference(row: object, where: str) -> Preference:
    """One preference row, or a one-line error naming ``where`` and what is missing."""
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in PREFERENCE_KEYS):
        raise ValueError(
            f"{where}: a DPO row needs the string fields 'prompt', 'chosen' and 'rejected'"
        )
    return Preference(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"])


def load_preferences(config: MilesConfig, recipe: Recipe) -> list[Preference]:
    """The train split as preference pairs: ``data.train_path`` or the recipe's dataset."""
    path = config.data.train_path
    if path is not None:
        pairs = []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if line.strip():
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not JSON ({exc.msg})") from exc
                pairs.append(preference(row, where))
    elif recipe.dataset is not None:
        pairs = [
            preference(row, f"@miles.dataset row {i}")
            for i, row in enumerate(recipe.dataset("train"))
        ]
    else:
        raise ValueError("no train data: set data.train_path or add a @miles.dataset function")
    if not pairs:
        raise ValueError("the train dataset is empty")
    return pairs


def read_jsonl(path: Path) -> list[Prompt]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(Prompt(prompt=str(row["prompt"]), label=str(row.get("label", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected {{'prompt': ..., 'label': ...}}") from exc
    return rows


def load_prompts(config: MilesConfig, recipe: Recipe, split: str) -> list[Prompt]:
    path = config.data.train_path if split == "train" else config.data.eval_path
    if path is not None:
        rows = read_jsonl(path)
    elif recipe.dataset is not None:
        rows = [
            Prompt(prompt=str(r["prompt"]), label=str(r.get("label", "")))
            for r in recipe.dataset(split)
        ]
    else:
        raise ValueError(f"no {split} data: set data.{split}_path or add a @miles.dataset function")
    if split == "eval":
        rows = list(islice(rows, config.data.eval_size))
    if not rows:
        raise ValueError(f"the {split} dataset is empty")
    return rows
