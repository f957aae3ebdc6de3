"""`miles run` checks the recipe, config, model, tokenizer, data and reward before it starts
anything: each problem is one line saying what to fix, and the exit code is 2."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from miles.cli.main import main


@pytest.fixture(scope="module")
def model_dir(addition_task: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer, saved in shards with an index."""
    directory = tmp_path_factory.mktemp("model")
    tokenizer = addition_task.build_tokenizer(directory)
    addition_task.make_model(tokenizer).save_pretrained(directory, max_shard_size="500KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def write_recipe(directory: Path, body: str = "", reward: str = "return 1.0") -> Path:
    path = directory / "recipe.py"
    path.write_text(
        textwrap.dedent(
            """\
            import miles

            config = miles.MilesConfig()
            {body}

            @miles.reward
            def exact(sample):
                {reward}
            """
        ).format(body=body, reward=reward)
    )
    return path


def write_data(directory: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    path = directory / "train.jsonl"
    rows = rows if rows is not None else [{"prompt": "1+2=", "label": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def miles_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, recipe: Path, *settings: str
) -> tuple[int, list[str]]:
    argv = ["run", str(recipe), "--set", f"run.output_dir='{tmp_path / 'runs'}'"]
    for setting in settings:
        argv += ["--set", setting]
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_several_problems_are_reported_together_and_nothing_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = miles_run(capsys, tmp_path, write_recipe(tmp_path), "reward.weights={nope=1.0}")
    assert code == 2
    assert lines == [
        "miles: model.path is not set: point it at a Hugging Face model directory "
        "(--set model.path=DIR, or set it in the recipe's @miles.setup)",
        "miles: no training data: set data.train_path or add a @miles.dataset function",
        "miles: reward.weights names 'nope', which is no @miles.reward function or reward "
        "model (known: exact)",
        "miles: nothing was started; fix the above and run again",
    ]
    assert not list((tmp_path / "runs").glob("*/nats"))  # no server was started


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("'/nonexistent/model'", "model.path: /nonexistent/model does not exist"),
        (
            "'someorg/some-model'",
            "model.path: someorg/some-model is neither a directory nor a model in the local "
            "Hugging Face cache",
        ),
    ],
)
def test_a_model_that_is_not_here_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, expected: str
) -> None:
    data = write_data(tmp_path)
    code, lines = miles_run(
        capsys, tmp_path, write_recipe(tmp_path), f"model.path={model}", f"data.train_path='{data}'"
    )
    assert code == 2 and lines[0].startswith(f"miles: {expected}"), lines


def test_a_broken_model_directory_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_dir: Path
) -> None:
    data, recipe = write_data(tmp_path), write_recipe(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, lines = miles_run(
        capsys, tmp_path, recipe, f"model.path='{broken}'", f"data.train_path='{data}'"
    )
    assert code == 2
    assert lines[0] == f"miles: model.path: {broken} lacks shards its index names: {shard.name}"
    (broken / "config.json").unlink()
    code, lines = miles_run(
        capsys, tmp_path, recipe, f"model.path='{broken}'", f"data.train_path='{data}'"
    )
    assert (
        lines[0]
        == f"miles: model.path: {broken} has no config.json: not a Hugging Face model directory"
    )


def test_a_model_without_a_tokenizer_can_take_one_from_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_dir: Path
) -> None:
    data, recipe = write_data(tmp_path), write_recipe(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in model_dir.iterdir():
        if item.name == "config.json" or item.name.startswith("model"):
            shutil.copy(item, bare / item.name)
    code, lines = miles_run(
        capsys, tmp_path, recipe, f"model.path='{bare}'", f"data.train_path='{data}'"
    )
    assert code == 2 and lines[0].startswith(f"miles: cannot load a tokenizer from {bare}"), lines


@pytest.mark.parametrize(
    ("rows", "settings", "expected"),
    [
        (
            [{"question": "1+2="}],
            (),
            "train.jsonl:1: no 'prompt' column (data.prompt_key); the row has ['question']",
        ),
        (
            [{"messages": [{"role": "user", "content": "1+2="}]}],
            ("data.prompt_key=messages",),
            "the train rows are chat messages but the tokenizer has no chat_template",
        ),
    ],
)
def test_data_problems_name_the_row_and_the_setting(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model_dir: Path,
    rows: list[dict[str, Any]],
    settings: tuple[str, ...],
    expected: str,
) -> None:
    data = write_data(tmp_path, rows)
    code, lines = miles_run(
        capsys,
        tmp_path,
        write_recipe(tmp_path),
        f"model.path='{model_dir}'",
        f"data.train_path='{data}'",
        *settings,
    )
    assert code == 2 and expected in lines[0], lines


def test_a_reward_that_fails_on_a_real_row_is_caught_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_dir: Path
) -> None:
    data = write_data(tmp_path)
    recipe = write_recipe(tmp_path, reward="return float(sample.metadata['answer'])")
    code, lines = miles_run(
        capsys, tmp_path, recipe, f"model.path='{model_dir}'", f"data.train_path='{data}'"
    )
    assert code == 2
    assert lines[0] == (
        "miles: reward on the first train row (its label '3' as the completion): "
        "exact raised KeyError: 'answer'"
    )


def test_a_recipe_that_does_not_import_and_a_bad_value_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, body="oops = (")
    assert miles_run(capsys, tmp_path, recipe)[1] == [
        "miles: recipe.py failed to import: recipe.py:4: SyntaxError: '(' was never closed"
    ]
    recipe = write_recipe(tmp_path, body="value = {}['missing']")
    assert miles_run(capsys, tmp_path, recipe)[1] == [
        "miles: recipe.py failed to import: recipe.py:4: KeyError: 'missing'"
    ]
    code, lines = miles_run(capsys, tmp_path, write_recipe(tmp_path), "trainer.lr=-1")
    assert code == 2
    assert lines == [
        "miles: invalid configuration: trainer.lr: Input should be greater than or equal to 0"
    ]
