"""Blob stores against the real thing: a directory, and JetStream's Object Store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miles import shards
from miles.runtime import embedded
from miles.runtime.bus import NatsBus, connect_nats
from miles.shards import WEIGHTS_FILE, ChecksumMismatch, sha256_file
from miles.weights.blobs import DirBlobStore, ObjectBlobStore

pytestmark = pytest.mark.integration


def weights_dir(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / WEIGHTS_FILE).write_bytes(bytes(range(256)) * (size // 256))
    (root / "config.json").write_text('{"model_type": "llama"}')
    return root


async def test_dir_store_round_trip_and_checksum(tmp_path: Path) -> None:
    source = weights_dir(tmp_path / "staging", 1 << 16)
    sha = sha256_file(source / WEIGHTS_FILE)
    store = DirBlobStore(tmp_path / "blobs")
    uri = await store.put_dir(source, "weights/v1")
    assert uri.startswith("file://")
    fetched = await store.get_dir(uri, sha)
    assert (fetched / "config.json").read_text() == '{"model_type": "llama"}'
    with pytest.raises(ChecksumMismatch):
        await store.get_dir(uri, "0" * 64)


async def test_object_store_streams_a_multi_chunk_blob(
    tmp_path: Path, nats_server: embedded.Server
) -> None:
    nc = await connect_nats(nats_server.url, 5, "blob-test")
    try:
        source = weights_dir(tmp_path / "staging", 3 << 20)  # several 128 KiB chunks
        sha = sha256_file(source / WEIGHTS_FILE)
        bus = NatsBus(nc, "blobs", "blob-test", 8 << 20)
        store = ObjectBlobStore(bus, "miles_test_blobs", tmp_path / "cache")
        uri = await store.put_dir(source, "weights/v1")
        assert uri == "nats-os://miles_test_blobs/weights/v1"
        fetched = await store.get_dir(uri, sha)
        assert sha256_file(fetched / WEIGHTS_FILE) == sha
        assert (fetched / "config.json").exists()
        with pytest.raises(ChecksumMismatch):
            await ObjectBlobStore(bus, "miles_test_blobs", tmp_path / "c2").get_dir(uri, "0" * 64)
    finally:
        await nc.close()


def sharded_weights_dir(root: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """Weights in several shards and an index, as the trainer writes them past
    ``trainer.max_shard_bytes``; their digest."""
    generator = torch.Generator().manual_seed(0)
    written = {f"layers.{i}.weight": torch.randn(50_000, generator=generator) for i in range(5)}
    digest = shards.write_weights(written.items(), root, max_shard_bytes=400_000)
    (root / "config.json").write_text('{"model_type": "llama"}')
    assert len(shards.weight_files(root)) > 1
    return root, digest, written


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[n], right[n]) for n in left)


async def test_dir_store_round_trips_sharded_weights_and_checks_every_shard(
    tmp_path: Path,
) -> None:
    source, digest, written = sharded_weights_dir(tmp_path / "staging")
    store = DirBlobStore(tmp_path / "blobs")
    uri = await store.put_dir(source, "weights/v1")

    fetched = await store.get_dir(uri, digest)
    assert same(shards.read_weights(fetched), written)
    corrupt(shards.weight_files(fetched)[1])
    with pytest.raises(ChecksumMismatch, match="model-00002-of-"):
        await store.get_dir(uri, digest)


async def test_object_store_round_trips_sharded_weights_and_checks_every_shard(
    tmp_path: Path, nats_server: embedded.Server
) -> None:
    nc = await connect_nats(nats_server.url, 5, "blob-shards-test")
    try:
        source, digest, written = sharded_weights_dir(tmp_path / "staging")
        bus = NatsBus(nc, "blobs", "blob-shards-test", 8 << 20)
        store = ObjectBlobStore(bus, "miles_test_shards", tmp_path / "cache")
        uri = await store.put_dir(source, "weights/v1")

        fetched = await store.get_dir(uri, digest)
        assert same(shards.read_weights(fetched), written)
        corrupt(shards.weight_files(fetched)[1])  # a damaged local copy is fetched again
        again = await store.get_dir(uri, digest)
        assert same(shards.read_weights(again), written)
        with pytest.raises(ChecksumMismatch):
            await ObjectBlobStore(bus, "miles_test_shards", tmp_path / "c2").get_dir(uri, "0" * 64)
    finally:
        await nc.close()
