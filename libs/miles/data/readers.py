"""Reading a split's rows from where ``data.<split>_path`` points, each with where it came from
(``file:line`` or ``file#row``), so an error names the row to fix.

JSONL (``.jsonl``, ``.json`` lines), Parquet, a directory written by ``datasets``'
``save_to_disk`` (a ``DatasetDict`` gives its ``train`` split to training and its ``test`` or
``validation`` split to evaluation), or any other local file ``datasets.load_dataset`` reads
(``.csv``, a JSON array). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = tuple[str, Any]

SPLIT_NAMES = {"train": ("train",), "eval": ("test", "validation", "eval")}
BY_SUFFIX = {".csv": "csv", ".tsv": "csv", ".json": "json", ".txt": "text", ".arrow": "arrow"}


class DataError(ValueError):
    """A dataset that cannot be used, with a message saying what to fix."""


def read_rows(path: Path, split: str) -> list[Row]:
    if not path.exists():
        raise DataError(f"data.{split}_path: {path} does not exist")
    if path.is_dir():
        return _saved_dataset(path, split)
    if path.suffix == ".jsonl" or (path.suffix == ".json" and _json_lines(path)):
        return _jsonl(path)
    if path.suffix == ".parquet":
        return _parquet(path)
    if path.suffix in BY_SUFFIX:
        return _load_dataset(path, BY_SUFFIX[path.suffix])
    raise DataError(
        f"data.{split}_path: {path.name} is not .jsonl, .parquet, .csv, .json or a directory "
        "saved by datasets' save_to_disk"
    )


def _json_lines(path: Path) -> bool:
    with path.open() as handle:
        return not handle.read(1).lstrip().startswith("[")


def _jsonl(path: Path) -> list[Row]:
    found: list[Row] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                found.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from exc
    return found


def _parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors have no common base worth naming
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    return [(f"{path}#{i}", row) for i, row in enumerate(table.to_pylist())]


def _saved_dataset(path: Path, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(
            f"data.{split}_path: {path} is a directory but not one written by datasets' "
            "save_to_disk"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = [n for n in SPLIT_NAMES[split] if n in loaded]
        if not names:
            raise DataError(
                f"data.{split}_path: {path} has the splits {sorted(loaded)}, none of "
                f"{list(SPLIT_NAMES[split])}: save the split as its own dataset"
            )
        loaded = loaded[names[0]]
    return [(f"{path}#{i}", row) for i, row in enumerate(loaded)]


def _load_dataset(path: Path, builder: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in many types
        raise DataError(f"{path}: datasets could not read it as {builder} ({exc})") from exc
    return [(f"{path}#{i}", row) for i, row in enumerate(loaded)]
