"""miles.shards: the one owner of a weights directory's layout (one file, or shards and an index)
and of the digest that names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from miles import shards


def tensors(count: int = 6, numel: int = 1000) -> dict[str, torch.Tensor]:
    """``count`` fp32 tensors of ``numel`` elements (4,000 bytes each)."""
    generator = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(numel, generator=generator) for i in range(count)}


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[n], right[n]) for n in left)


def test_weights_that_fit_are_one_file_named_by_its_sha256(tmp_path: Path) -> None:
    written = tensors()
    digest = shards.write_weights(written.items(), tmp_path, metadata={"note": "x"})

    assert sorted(p.name for p in tmp_path.iterdir()) == [shards.WEIGHTS_FILE]
    assert digest == shards.sha256_file(tmp_path / shards.WEIGHTS_FILE)
    assert shards.weights_digest(tmp_path) == digest
    shards.verify_weights(tmp_path, digest)
    assert same(shards.read_weights(tmp_path), written)
    assert same(load_file(tmp_path / shards.WEIGHTS_FILE), written)  # plain safetensors
    assert shards.weights_metadata(tmp_path) == {"format": "pt", "note": "x"}


def test_larger_weights_are_shards_and_a_hugging_face_index_covering_them(
    tmp_path: Path,
) -> None:
    written = tensors()
    digest = shards.write_weights(written.items(), tmp_path, 8_000, metadata={"note": "x"})

    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([shards.INDEX_FILE, *files])
    index = json.loads((tmp_path / shards.INDEX_FILE).read_text())
    assert index["weight_map"] == {
        name: files[i // 2] for i, name in enumerate(written)
    }  # two 4,000-byte tensors a shard, in the order they came
    assert index["metadata"]["total_size"] == 6 * 4000
    assert index["metadata"][shards.SHARD_DIGESTS] == {
        file: shards.sha256_file(tmp_path / file) for file in files
    }
    assert digest == shards.sha256_file(tmp_path / shards.INDEX_FILE)
    assert shards.weights_digest(tmp_path) == digest
    shards.verify_weights(tmp_path, digest)
    assert [p.name for p in shards.weight_files(tmp_path)] == files
    assert same(shards.read_weights(tmp_path), written)
    assert shards.weights_metadata(tmp_path) == {"note": "x"}
    with shards.open_weights(tmp_path) as get:
        assert all(torch.equal(get(name), tensor) for name, tensor in written.items())
    assert same(dict(shards.iter_weights(tmp_path)), written)


def test_a_tensor_larger_than_a_shard_gets_a_shard_of_its_own(tmp_path: Path) -> None:
    written = {"small": torch.zeros(10), "big": torch.zeros(5000), "last": torch.zeros(10)}
    shards.write_weights(written.items(), tmp_path, 1_000)
    index = json.loads((tmp_path / shards.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert same(shards.read_weights(tmp_path), written)


def test_a_corrupted_shard_fails_verification_naming_it(tmp_path: Path) -> None:
    digest = shards.write_weights(tensors().items(), tmp_path, 8_000)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor's data
    shard.write_bytes(bytes(data))

    assert shards.weights_digest(tmp_path) == digest  # the index is intact...
    with pytest.raises(shards.ChecksumMismatch, match=r"model-00002-of-00003\.safetensors"):
        shards.verify_weights(tmp_path, digest)  # ...but it names every shard's bytes
    with pytest.raises(shards.ChecksumMismatch, match="expected 0000"):
        shards.verify_weights(tmp_path, "0" * 64)


def test_a_shard_the_index_records_no_digest_for_fails_verification(tmp_path: Path) -> None:
    """An index as ``save_pretrained`` writes it names no shard's sha256: it cannot be verified."""
    shards.write_weights(tensors().items(), tmp_path, 8_000)
    index = json.loads((tmp_path / shards.INDEX_FILE).read_text())
    del index["metadata"][shards.SHARD_DIGESTS]
    (tmp_path / shards.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(shards.ChecksumMismatch, match="records no sha256"):
        shards.verify_weights(tmp_path, shards.weights_digest(tmp_path))


def test_the_same_tensors_give_the_same_bytes(tmp_path: Path) -> None:
    metadata = {f"key{i}": str(i) for i in range(8)}  # safetensors orders these at random
    for max_shard_bytes in (shards.MAX_SHARD_BYTES, 8_000):
        first = shards.write_weights(tensors().items(), tmp_path / "a", max_shard_bytes, metadata)
        again = shards.write_weights(tensors().items(), tmp_path / "b", max_shard_bytes, metadata)
        assert first == again


def test_rewriting_a_directory_leaves_no_files_of_the_other_layout(tmp_path: Path) -> None:
    shards.write_weights(tensors().items(), tmp_path, 8_000)
    shards.write_weights(tensors().items(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [shards.WEIGHTS_FILE]
    shards.write_weights(tensors().items(), tmp_path, 8_000)
    assert shards.WEIGHTS_FILE not in {p.name for p in tmp_path.iterdir()}
    assert same(shards.read_weights(tmp_path), tensors())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.embed.weight


def test_a_tied_parameter_is_written_once_and_loaded_back_into_both_names(
    tmp_path: Path,
) -> None:
    source, target = Tied(), Tied()
    kept = shards.unaliased(source.state_dict())
    assert list(kept) == ["embed.weight"]
    shards.write_weights(kept.items(), tmp_path)

    shards.load_module(target, tmp_path)

    assert torch.equal(target.head.weight, source.embed.weight)
    (tmp_path / shards.WEIGHTS_FILE).unlink()
    shards.write_weights(
        {"embed.weight": torch.zeros(4, 3), "other": torch.zeros(1)}.items(), tmp_path
    )
    with pytest.raises(ValueError, match=r"unexpected \['other'\]"):
        shards.load_module(target, tmp_path)
