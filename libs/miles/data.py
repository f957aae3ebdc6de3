"""Prompt datasets: a JSONL file of ``{"prompt": ..., "label": ...}`` or the recipe's iterable."""

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
