"""`miles export`'s reading side against the real thing: the manifest from redis-server (leased
while read) or, once the run's Redis is gone, from steps.jsonl; the weights from a directory or
JetStream's Object Store (a finished run's own JetStream store served again)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import msgspec
import pytest
import torch
from contract.record_harness import manifest
from transformers import AutoModelForCausalLM

from miles.cli.export import export
from miles.config import MilesConfig, load_config
from miles.runtime import embedded
from miles.runtime.bus import NatsBus, Unreachable, connect_nats
from miles.runtime.checkpoint import Manifests
from miles.runtime.store import connect_redis
from miles.shards import WEIGHTS_FILE, ChecksumMismatch, sha256_file
from miles.weights.blobs import BlobStore
from miles.weights.export import ExportError
from miles.weights.follow import make_blob_store

pytestmark = pytest.mark.integration


def run_config(tiny_model: Path, blob_store: str) -> MilesConfig:
    config = load_config(overrides=[f"infra.blob_store={blob_store}"])
    config.model.path = tiny_model
    return config


async def put_steps(blobs: BlobStore, tiny_model: Path, scratch: Path, steps: int) -> list[str]:
    """The tiny model's weights as steps 1..``steps``; their URIs."""
    uris = []
    for step in range(1, steps + 1):
        staging = scratch / f"v{step}"
        staging.mkdir(parents=True)
        for name in (WEIGHTS_FILE, "config.json"):
            shutil.copy(tiny_model / name, staging / name)
        uris.append(await blobs.put_dir(staging, f"weights/v{step}-a"))
    return uris


def step_line(run_id: str, step: int, uri: str, sha: str) -> bytes:
    """A line of steps.jsonl, as `miles run` writes it at the end."""
    committed = msgspec.structs.replace(manifest(run_id, step, f"b{step}", uri), weights_sha256=sha)
    return msgspec.json.encode(committed) + b"\n"


def loads(out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


async def test_a_step_in_the_object_store_is_exported_under_a_lease(
    tmp_path: Path, tiny_model: Path, nats_server: embedded.Server, redis_server: embedded.Server
) -> None:
    run_id = f"export-{uuid.uuid4().hex[:6]}"
    config = run_config(tiny_model, "nats")
    nc = await connect_nats(nats_server.url, 5, "export-test")
    client = await connect_redis(redis_server.url, 5)
    try:
        bus = NatsBus(nc, run_id, "trainer", 8 << 20)
        uris = await put_steps(make_blob_store(config, bus, tmp_path), tiny_model, tmp_path, 2)
        manifests = Manifests(client, run_id)
        sha = sha256_file(tiny_model / WEIGHTS_FILE)
        for step, uri in enumerate(uris, start=1):
            committed = manifest(run_id, step, f"b{step}", uri)
            await manifests.commit(msgspec.structs.replace(committed, weights_sha256=sha))
        urls = {"redis_url": redis_server.url, "nats_url": nats_server.url}

        done = await export(
            run_id, tmp_path, config, step=None, dtype="bf16", out=tmp_path / "final", **urls
        )

        assert (done.step, done.path) == (2, tmp_path / "final")
        loads(done.path)
        assert await manifests.leased() == set()  # released
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # scratch
        await manifests.condemn([1])
        with pytest.raises(ExportError, match=r"step 1 of run .* is no longer in the blob store"):
            await export(
                run_id, tmp_path, config, step=1, dtype="bf16", out=tmp_path / "one", **urls
            )
        with pytest.raises(ExportError, match="no committed step 7"):
            await export(run_id, tmp_path, config, step=7, dtype="bf16", out=tmp_path / "x", **urls)
    finally:
        await nc.close()
        await client.aclose()


async def test_a_finished_run_is_read_from_its_files_and_its_own_jetstream_store(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Redis and NATS of the run are gone: steps.jsonl gives the step, and the export serves
    the run's JetStream store again to read the weights."""
    run_id = f"export-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / run_id
    config = run_config(tiny_model, "nats")
    server = embedded.start_nats(run_dir / "nats")  # the run's embedded nats-server
    nc = await connect_nats(server.url, 5, "export-test")
    bus = NatsBus(nc, run_id, "trainer", 8 << 20)
    uris = await put_steps(make_blob_store(config, bus, run_dir), tiny_model, tmp_path, 2)
    await nc.close()
    server.stop()
    sha = sha256_file(tiny_model / WEIGHTS_FILE)
    lines = [step_line(run_id, 1, uris[0], sha), step_line(run_id, 2, uris[1], "0" * 64)]
    (run_dir / "steps.jsonl").write_bytes(b"".join(lines))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 2}))
    gone = {"redis_url": server.url.replace("nats", "redis"), "nats_url": server.url}

    done = await export(
        run_id, run_dir, config, step=1, dtype="bf16", out=run_dir / "step-1", **gone
    )
    loads(done.path)

    with pytest.raises(ChecksumMismatch):  # checked before anything is written
        await export(run_id, run_dir, config, step=2, dtype="bf16", out=run_dir / "two", **gone)
    assert not (run_dir / "two").exists()


async def test_what_cannot_be_reached_is_said_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    run_id = "export-gone"
    dead = f"127.0.0.1:{embedded.free_port()}"
    config = run_config(tiny_model, "nats")
    (tmp_path / "steps.jsonl").write_bytes(step_line(run_id, 1, "nats-os://b/weights/v1", "0"))
    with pytest.raises(Unreachable, match=r"cannot reach NATS at .* set NATS_URL"):
        await export(
            run_id,
            tmp_path,
            config,
            step=None,
            dtype="bf16",
            out=tmp_path / "final",
            redis_url=None,
            nats_url=f"nats://{dead}",
        )
    (tmp_path / "steps.jsonl").unlink()  # a run still going: only its Redis has the steps
    with pytest.raises(Unreachable, match=r"cannot reach the Redis of run .* set REDIS_URL"):
        await export(
            run_id,
            tmp_path,
            config,
            step=None,
            dtype="bf16",
            out=tmp_path / "final",
            redis_url=f"redis://{dead}/0",
            nats_url=None,
        )
