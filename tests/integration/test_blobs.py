"""Blob stores against the real thing: a directory, and JetStream's Object Store."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles.runtime import embedded
from miles.runtime.bus import NatsBus, connect_nats
from miles.weights.blobs import (
    WEIGHTS_FILE,
    ChecksumMismatch,
    DirBlobStore,
    ObjectBlobStore,
    sha256_file,
)

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
