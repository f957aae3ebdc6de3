"""The exported model: a Hugging Face directory that AutoModelForCausalLM and AutoTokenizer load,
in the dtype asked for, with logits equal to the trainer's saved weights cast to that dtype;
read from one safetensors file or shards, written in one file or shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from miles.shards import INDEX_FILE, WEIGHTS_FILE, verify_weights, weight_files
from miles.weights.export import MARKER, ExportError, write_model

PROVENANCE = {"run_id": "r", "step": 3, "weights_sha256": "0" * 64}
PROMPT = "12+34="


def logits(directory: Path, dtype: torch.dtype, tokenizer: Path | None = None) -> torch.Tensor:
    """The model's logits on ``PROMPT``, encoded by the tokenizer in ``tokenizer`` (default:
    the model's directory)."""
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    encode = AutoTokenizer.from_pretrained(str(tokenizer or directory))
    ids = encode(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def saved(tiny_model: Path, tmp_path: Path) -> Path:
    """The trainer's saved weights of a step, as the blob store holds them (fp32)."""
    source = tmp_path / "blob"
    source.mkdir()
    for name in (WEIGHTS_FILE, "config.json"):
        shutil.copy(tiny_model / name, source / name)
    return source


def test_a_bf16_export_loads_with_the_trainers_logits(
    saved: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = write_model(saved, tmp_path / "final", "bf16", tiny_model, tiny_model, PROVENANCE)

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    trained = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    weights = model.state_dict()
    for name, tensor in trained.state_dict().items():  # the trainer's, rounded once to bf16
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name
    torch.testing.assert_close(
        logits(out, torch.bfloat16).float(),
        logits(saved, torch.float32, tokenizer=tiny_model),
        atol=0.05,
        rtol=0.02,
    )  # to bf16's 8 bits of mantissa
    assert (out / "generation_config.json").read_text() == (
        tiny_model / "generation_config.json"
    ).read_text()
    assert json.loads((out / MARKER).read_text()) == PROVENANCE | {"dtype": "bf16"}


def test_sharded_weights_are_read_and_written_through_an_index(
    tiny_model: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    source = tmp_path / "sharded"
    model.save_pretrained(str(source), max_shard_size="400KB")
    assert (source / INDEX_FILE).is_file() and len(weight_files(source)) > 1

    out = write_model(source, tmp_path / "out", "fp32", tiny_model, None, PROVENANCE, 500_000)

    assert not (out / WEIGHTS_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == len(weight_files(out)) > 1
    assert torch.equal(logits(out, torch.float32), logits(tiny_model, torch.float32))
    generation = json.loads((out / "generation_config.json").read_text())  # no base model given
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (1, 0)
    assert "bos_token_id" not in generation  # None in the model's config


def test_a_sharded_step_exports_to_a_model_from_pretrained_loads(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A step the trainer wrote in shards (``trainer.max_shard_bytes``) is itself a HF model
    directory, and exports to one whole file, or to shards again."""
    from miles.config import GRPO, TrainerConfig
    from miles.trainer import TorchTrainer

    trainer = TrainerConfig(threads=1, max_shard_bytes=200_000)
    step = tmp_path / "step"
    digest = TorchTrainer(str(tiny_model), trainer, GRPO(), 0).save_weights(str(step))
    verify_weights(step, digest)
    assert len(weight_files(step)) > 1
    expected = logits(tiny_model, torch.float32)
    assert torch.equal(logits(step, torch.float32, tokenizer=tiny_model), expected)

    whole = write_model(step, tmp_path / "whole", "fp32", tiny_model, None, PROVENANCE)
    assert weight_files(whole) == [whole / WEIGHTS_FILE]
    assert torch.equal(logits(whole, torch.float32), expected)
    split = write_model(step, tmp_path / "split", "fp32", tiny_model, None, PROVENANCE, 300_000)
    assert len(weight_files(split)) > 1
    assert torch.equal(logits(split, torch.float32), expected)


def test_an_earlier_export_is_replaced_and_anything_else_refused(
    saved: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "final"
    write_model(saved, out, "fp16", tiny_model, tiny_model, PROVENANCE)
    write_model(saved, out, "bf16", tiny_model, tiny_model, PROVENANCE | {"step": 4})
    assert json.loads((out / MARKER).read_text())["step"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a miles export"):
        write_model(saved, mine, "bf16", tiny_model, tiny_model, PROVENANCE)
    assert (mine / "notes.txt").read_text() == "keep me"
