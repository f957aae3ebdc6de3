"""``model.path``: a local directory (one safetensors file or shards with an index) or a hub id
found in the local Hugging Face cache, never downloaded; the tokenizer may live elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants

from miles import models
from miles.config import ModelConfig
from miles.engine.transformers_engine import TransformersEngine


@pytest.fixture(scope="module")
def task(addition_task: Any) -> Any:
    return addition_task


@pytest.fixture(scope="module")
def one_file(task: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("one-file")
    task.make_model(task.build_tokenizer(directory)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sharded(task: Any, one_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sharded")
    model = task.make_model(task.build_tokenizer(directory))  # same seed: same weights
    model.save_pretrained(directory, max_shard_size="300KB")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    return directory


def test_a_sharded_model_loads_the_same_weights_as_one_file(one_file: Path, sharded: Path) -> None:
    assert models.model_problems(sharded) == []
    outputs = []
    for directory in (one_file, sharded):
        engine = TransformersEngine(str(directory), threads=1)
        state = engine._model.state_dict()
        outputs.append({k: v.clone() for k, v in state.items()})
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def test_a_hub_id_resolves_from_the_local_cache_only(
    one_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(one_file, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.local_dir("acme/tiny") == snapshot.resolve()
    config = ModelConfig(path=Path("acme/tiny"))
    assert models.load_tokenizer(config).eos_token == "<eos>"
    with pytest.raises(models.ModelError, match="acme/other is neither a directory nor a model"):
        models.local_dir("acme/other")


def test_the_tokenizer_can_come_from_its_own_directory(one_file: Path, tmp_path: Path) -> None:
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for item in one_file.glob("*"):
        if item.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(item, weights_only / item.name)
    with pytest.raises(models.ModelError, match="cannot load a tokenizer from"):
        models.load_tokenizer(ModelConfig(path=weights_only))
    separate = ModelConfig(path=weights_only, tokenizer_path=one_file)
    assert models.load_tokenizer(separate).eos_token == "<eos>"


def test_problems_with_a_model_directory(one_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert models.model_problems(empty) == [
        f"model.path: {empty} has no config.json: not a Hugging Face model directory"
    ]
    shutil.copy(one_file / "config.json", empty / "config.json")
    assert models.model_problems(empty) == [f"model.path: {empty} has no weights (*.safetensors)"]
    with pytest.raises(models.ModelError, match="is a file; give the model's directory"):
        models.local_dir(empty / "config.json")
