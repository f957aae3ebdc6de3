"""Datasets: every format reads the same rows, columns reach the prompt typed, chat rows are
rendered with the template, long prompts are dropped and counted, held-out data is optional,
and each problem is one line naming the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miles.config import DataConfig, MilesConfig
from miles.data import DataError, load_prompts, row_at
from miles.recipe import Recipe

ROWS: list[dict[str, Any]] = [
    {"question": "1+2=", "answer": 3, "tags": ["easy"], "weight": 0.5},
    {"question": "40+2=", "answer": 42, "tags": [], "weight": 1.5},
]


def recipe(dataset: Any = None) -> Recipe:
    return Recipe(path=Path("recipe.py"), config=MilesConfig(), rewards={}, dataset=dataset)


def config(train: Path | None, **data: Any) -> MilesConfig:
    keys = {"prompt_key": "question", "label_key": "answer"}
    return MilesConfig(data=DataConfig(train_path=train, **(keys | data)))


def write(kind: str, directory: Path, rows: list[dict[str, Any]]) -> Path:
    if kind == "jsonl":
        path = directory / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        path = directory / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "saved":
        path = directory / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "saved_dict":
        path = directory / "saved_dict"
        splits = {
            "train": datasets.Dataset.from_list(rows),
            "test": datasets.Dataset.from_list(rows[:1]),
        }
        datasets.DatasetDict(splits).save_to_disk(str(path))
    else:  # a JSON array, read by datasets.load_dataset("json", ...)
        path = directory / "rows.json"
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "saved_dict", "json_array"])
def test_every_format_gives_the_same_typed_prompts(tmp_path: Path, kind: str) -> None:
    loaded = load_prompts(config(write(kind, tmp_path, ROWS)), recipe(), "train")
    assert [p.prompt for p in loaded.prompts] == ["1+2=", "40+2="]
    assert [p.label for p in loaded.prompts] == [3, 42]  # an int, not "3"
    first = loaded.prompts[0].metadata
    assert first == {"answer": 3, "tags": ["easy"], "weight": 0.5}
    assert loaded.dropped == 0


def test_a_saved_dataset_dict_gives_its_test_split_to_evaluation(tmp_path: Path) -> None:
    path = write("saved_dict", tmp_path, ROWS)
    cfg = config(None, eval_path=path)
    cfg.data.train_path = path
    assert len(load_prompts(cfg, recipe(), "train").prompts) == 2
    assert len(load_prompts(cfg, recipe(), "eval").prompts) == 1


def test_csv_is_read_by_datasets(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\n1+2=,3\n")
    assert load_prompts(config(path), recipe(), "train").prompts[0].label == 3


def test_held_out_data_is_optional_and_training_data_is_not(tmp_path: Path) -> None:
    cfg = config(write("jsonl", tmp_path, ROWS))
    assert load_prompts(cfg, recipe(), "eval").prompts == []
    with pytest.raises(DataError, match=r"no training data: set data.train_path"):
        load_prompts(config(None), recipe(), "train")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (
            '{"prompt": "x"}\n',
            r"rows.jsonl:1: no 'question' column \(data.prompt_key\); the row has \['prompt'\]",
        ),
        ('{"question": 7}\n', r"rows.jsonl:1: 'question' must be a string or chat messages"),
        ('{"question": "x"}\n{oops\n', r"rows.jsonl:2: not JSON"),
        ("", r"the train dataset is empty"),
    ],
)
def test_a_bad_row_is_one_line_naming_it(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=error):
        load_prompts(config(path), recipe(), "train")


def test_a_missing_or_unknown_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.train_path: .*nope.jsonl does not exist"):
        load_prompts(config(tmp_path / "nope.jsonl"), recipe(), "train")
    odd = tmp_path / "rows.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match=r"is not .jsonl, .parquet"):
        load_prompts(config(odd), recipe(), "train")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"not one written by datasets' save_to_disk"):
        load_prompts(config(tmp_path / "plain_dir"), recipe(), "train")


def test_chat_rows_are_rendered_with_the_template(tmp_path: Path, chat_tokenizer: Any) -> None:
    rows = [{"messages": [{"role": "user", "content": "1+2="}], "answer": 3}]
    path = write("parquet", tmp_path, rows)
    cfg = config(path, prompt_key="messages")
    prompt = load_prompts(cfg, recipe(), "train", chat_tokenizer).prompts[0]
    assert prompt.prompt == "<|user|>1+2=<|end|><|assistant|>"
    assert prompt.messages == rows[0]["messages"]
    assert "messages" not in prompt.metadata
    with pytest.raises(DataError, match=r"need a chat template, and no tokenizer"):
        load_prompts(cfg, recipe(), "train")


def test_chat_template_on_wraps_plain_prompts_and_off_refuses_messages(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    plain = config(write("jsonl", tmp_path, ROWS), chat_template="on")
    assert load_prompts(plain, recipe(), "train", chat_tokenizer).prompts[0].prompt == (
        "<|user|>1+2=<|end|><|assistant|>"
    )
    rows = [{"question": [{"role": "user", "content": "1+2="}], "answer": 3}]
    off = config(write("jsonl", tmp_path, rows), chat_template="off")
    with pytest.raises(DataError, match=r"holds chat messages but data.chat_template='off'"):
        load_prompts(off, recipe(), "train", chat_tokenizer)


def test_max_prompt_tokens_drops_long_rows_and_counts_them(
    tmp_path: Path, chat_tokenizer: Any
) -> None:
    cfg = config(write("jsonl", tmp_path, ROWS), max_prompt_tokens=4)
    loaded = load_prompts(cfg, recipe(), "train", chat_tokenizer)
    assert [p.prompt for p in loaded.prompts] == ["1+2="] and loaded.dropped == 1
    cfg.data.max_prompt_tokens = 2
    with pytest.raises(DataError, match=r"empty after dropping 2 rows over data.max_prompt_tokens"):
        load_prompts(cfg, recipe(), "train", chat_tokenizer)


def test_the_recipes_dataset_function_is_a_source_too() -> None:
    rows = recipe(lambda split: ROWS if split == "train" else [])
    loaded = load_prompts(config(None), rows, "train")
    assert [p.label for p in loaded.prompts] == [3, 42]


def test_each_epoch_is_a_new_order_of_every_row_fixed_by_the_seed() -> None:
    size = 50
    epochs = [
        [row_at(c, size, seed=7, shuffle=True) for c in range(e * size, (e + 1) * size)]
        for e in range(3)
    ]
    assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(size))
    again = [row_at(c, size, seed=7, shuffle=True) for c in range(size)]
    assert again == epochs[0]  # a restarted coordinator continues the same order
    assert [row_at(c, size, seed=8, shuffle=True) for c in range(size)] != epochs[0]
    assert [row_at(c, size, seed=7, shuffle=False) for c in range(size + 3)] == [
        *range(size),
        0,
        1,
        2,
    ]
