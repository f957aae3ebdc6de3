"""`miles export RUN [--step N] [--dtype bf16] [--out DIR]`: a committed step as a Hugging Face
model directory (``miles.weights.export``); `miles run` makes the same export of the last step
into ``runs/<run_id>/final/`` when a run finishes.

Where each part comes from:

- the run's config: ``runs/<run_id>/config.json`` (saved by `miles run`), else the run record in
  the Redis ``REDIS_URL`` names;
- the step's manifest (weights URI and sha256): the run's Redis (``--redis-url``/``REDIS_URL``,
  else the URL in its config, live while `miles run` is) when it holds the run, else
  ``steps.jsonl``, which `miles run` writes when the run ends (its embedded Redis is gone then);
- the weights: the blob store, a directory or JetStream's Object Store (``--nats-url``/
  ``NATS_URL``, else the config's; the JetStream store of a finished run's embedded nats-server
  is served again for the export).

With Redis, the export leases its step for as long as it reads (renewed every third of
``LEASE_SECONDS``), so the trainer's collection of old steps leaves it alone, and a step already
collected is refused at once. Without Redis the run is over: nothing collects any more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS

from miles import models
from miles.cli.common import run_urls
from miles.config import MilesConfig
from miles.runtime import embedded
from miles.runtime.bus import NatsBus, Unreachable, connect_nats
from miles.runtime.checkpoint import Manifests
from miles.runtime.store import RunKeys, connect_redis
from miles.weights.blobs import BlobMissing, BlobStore, DirBlobStore, ObjectBlobStore
from miles.weights.export import CONFIG_DTYPES, ExportDtype, ExportError, write_model
from miles.weights.follow import blob_bucket, blob_dir

log = logging.getLogger(__name__)
LEASE_SECONDS = 600.0


class StepRef(msgspec.Struct):
    """What an export needs of a manifest, or of a line of ``steps.jsonl``."""

    step: int
    weights_uri: str
    weights_sha256: str


@dataclass(frozen=True)
class Exported:
    run_id: str
    step: int
    dtype: ExportDtype
    path: Path


async def export(
    run_id: str,
    run_dir: Path,
    config: MilesConfig,
    *,
    step: int | None,
    dtype: ExportDtype,
    out: Path,
    redis_url: str | None,
    nats_url: str | None,
) -> Exported:
    """Export step ``step`` (None: the latest) of run ``run_id`` to ``out``."""
    async with contextlib.AsyncExitStack() as stack:
        manifests = await open_manifests(run_id, run_dir, redis_url, stack)
        ref = await find_step(run_id, run_dir, manifests, step)
        if manifests is not None:
            await stack.enter_async_context(leased(manifests, run_id, ref.step, config))
        blobs = await open_blobs(run_id, run_dir, config, nats_url, out, stack)
        try:
            source = await blobs.get_dir(ref.weights_uri, ref.weights_sha256)  # verified
        except BlobMissing:
            raise ExportError(collected(run_id, ref.step, config)) from None
        provenance = {"run_id": run_id, "step": ref.step, "weights_sha256": ref.weights_sha256}
        base = models.local_dir(config.model.path) if config.model.path else None
        tokenizer = models.tokenizer_dir(config.model)
        await asyncio.to_thread(write_model, source, out, dtype, tokenizer, base, provenance)
    return Exported(run_id, ref.step, dtype, out)


async def open_manifests(
    run_id: str, run_dir: Path, redis_url: str | None, stack: contextlib.AsyncExitStack
) -> Manifests | None:
    """The run's manifests in Redis; None when the run's files stand in for a Redis that is
    gone (or holds the run no more)."""
    finished = (run_dir / "steps.jsonl").is_file()
    if redis_url is None:
        if finished:
            return None
        raise Unreachable(f"no Redis to read run {run_id} from: set REDIS_URL to the run's Redis")
    try:
        client = await connect_redis(redis_url, timeout=3)
    except Unreachable:
        if finished:
            log.info("Redis at %s is gone; reading the steps of %s", redis_url, run_dir)
            return None
        raise Unreachable(
            f"cannot reach the Redis of run {run_id} at {redis_url}, and {run_dir} holds no "
            "steps.jsonl (written when `miles run` ends): set REDIS_URL to the run's Redis"
        ) from None
    stack.push_async_callback(client.aclose)
    manifests = Manifests(client, run_id)
    if await manifests.latest_step():
        return manifests
    if finished:
        return None
    raise ExportError(f"the Redis at {redis_url} holds no committed step of run {run_id}")


async def find_step(
    run_id: str, run_dir: Path, manifests: Manifests | None, step: int | None
) -> StepRef:
    if manifests is not None:
        latest = await manifests.latest_step()
        found = await manifests.get(step or latest)
        refs = (
            [] if found is None else [StepRef(found.step, found.weights_uri, found.weights_sha256)]
        )
    else:
        lines = (run_dir / "steps.jsonl").read_bytes().splitlines()
        refs = [msgspec.json.decode(line, type=StepRef) for line in lines if line]
        latest = refs[-1].step if refs else 0
        refs = [ref for ref in refs if ref.step == (step or latest)]
    if not refs:
        raise ExportError(f"run {run_id} has no committed step {step} (latest: {latest})")
    return refs[0]


@contextlib.asynccontextmanager
async def leased(
    manifests: Manifests, run_id: str, step: int, config: MilesConfig
) -> AsyncIterator[None]:
    """Hold ``step``'s weights against collection while the export reads them."""
    holder = f"export-{socket.gethostname()}-{os.getpid()}"
    if not await manifests.lease(step, holder, LEASE_SECONDS):
        raise ExportError(collected(run_id, step, config))

    async def renew() -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            await manifests.lease(step, holder, LEASE_SECONDS)

    renewal = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewal.cancel()
        await manifests.release(step, holder)


async def open_blobs(
    run_id: str,
    run_dir: Path,
    config: MilesConfig,
    nats_url: str | None,
    out: Path,
    stack: contextlib.AsyncExitStack,
) -> BlobStore:
    """The run's blob store; an object store downloads into a scratch directory beside ``out``
    (removed at the end)."""
    if config.infra.blob_store != "nats":
        return DirBlobStore(blob_dir(config, run_id, run_dir))
    nc = await reach_nats(run_id, run_dir, nats_url, config.infra.connect_timeout_seconds, stack)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-cache-", dir=out.parent))
    stack.callback(shutil.rmtree, scratch, True)
    bus = NatsBus(nc, run_id, "export", config.infra.max_payload_bytes)
    return ObjectBlobStore(bus, blob_bucket(run_id), scratch)


async def reach_nats(
    run_id: str,
    run_dir: Path,
    nats_url: str | None,
    timeout: float,
    stack: contextlib.AsyncExitStack,
) -> NATS:
    """The run's NATS; for a finished run whose embedded nats-server is gone, one started
    again on its JetStream store for as long as the export reads."""
    store = run_dir / "nats"
    try:
        if nats_url is None:
            raise Unreachable("no NATS URL")
        nc = await connect_nats(nats_url, timeout, name="miles-export")
    except Unreachable:
        if not ((store / "jetstream").is_dir() and (run_dir / "summary.json").is_file()):
            raise Unreachable(
                f"cannot reach NATS at {nats_url}, whose Object Store holds the weights of run "
                f"{run_id} (infra.blob_store = nats): set NATS_URL to the run's NATS"
            ) from None
        server = embedded.start_nats(store)
        stack.callback(server.stop)
        nc = await connect_nats(server.url, timeout, name="miles-export")
    stack.push_async_callback(nc.close)
    return nc


def collected(run_id: str, step: int, config: MilesConfig) -> str:
    keep = config.trainer.keep_checkpoints
    return (
        f"step {step} of run {run_id} is no longer in the blob store: the trainer keeps the "
        f"last {keep} step(s) (trainer.keep_checkpoints; 0 keeps all); `final/` holds the last"
    )


def load_run(run: str, output_dir: Path, redis_url: str | None) -> tuple[str, Path, MilesConfig]:
    """The run id, its directory and its config (the directory's, else the run record's)."""
    given = Path(run)
    run_dir = (given if given.is_dir() else output_dir / run).resolve()
    saved = run_dir / "config.json"
    if saved.is_file():
        return run_dir.name, run_dir, MilesConfig.model_validate_json(saved.read_text())
    if redis_url is None:
        raise FileNotFoundError(
            f"{saved} does not exist: give a run directory of `miles run`, or set REDIS_URL to "
            "the Redis that holds the run"
        )
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=3)
    try:
        raw = client.get(RunKeys(run_dir.name).config)
    except redis.exceptions.ConnectionError as exc:
        raise Unreachable(f"cannot reach Redis at {redis_url} ({exc})") from None
    finally:
        client.close()
    if raw is None:
        raise FileNotFoundError(f"no run {run_dir.name} in {saved.parent} or in {redis_url}")
    return run_dir.name, run_dir, MilesConfig.model_validate_json(raw)


def export_final(config: MilesConfig, run_id: str, run_dir: Path) -> Exported:
    """`miles run`'s export of the last step into ``runs/<run_id>/final``, while its NATS and
    Redis (``config.infra``) are still up."""
    dtype = config.trainer.export_dtype
    urls = {"redis_url": config.infra.redis_url, "nats_url": config.infra.nats_url}
    return asyncio.run(
        export(run_id, run_dir, config, step=None, dtype=dtype, out=run_dir / "final", **urls)
    )


def loading_hint(exported: Exported) -> str:
    """The lines that load an export, for the terminal."""
    return (
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{exported.path}", '
        f"dtype=torch.{CONFIG_DTYPES[exported.dtype]})\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{exported.path}")'
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "export",
        help="write a committed step as a Hugging Face model directory",
        description="Write step N (default: the latest) of a run as a Hugging Face model "
        "directory (weights in --dtype, config, tokenizer, generation config), loadable by "
        "AutoModelForCausalLM.from_pretrained. Reads the weights from the run's blob store "
        "(a directory, or the JetStream Object Store: NATS_URL), their sha256 from the run's "
        "Redis (REDIS_URL) or, for a finished run, runs/<id>/steps.jsonl.",
    )
    parser.add_argument("run", metavar="RUN", help="run id, or a run directory")
    parser.add_argument("--step", type=int, help="committed step (default: the latest)")
    parser.add_argument(
        "--dtype", choices=list(CONFIG_DTYPES), help="default: the run's trainer.export_dtype"
    )
    parser.add_argument(
        "--out", type=Path, help="default: <run dir>/final, or <run dir>/step-N with --step"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs"), help="where run ids are found"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL"
    )
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL"), help="default: $NATS_URL")


def run(args: argparse.Namespace) -> int:
    run_id, run_dir, config = load_run(args.run, args.output_dir, args.redis_url)
    out = args.out or run_dir / ("final" if args.step is None else f"step-{args.step}")
    nats_url, redis_url = run_urls(run_dir, config, args.nats_url, args.redis_url)
    exported = asyncio.run(
        export(
            run_id,
            run_dir,
            config,
            step=args.step,
            dtype=args.dtype or config.trainer.export_dtype,
            out=out.resolve(),
            redis_url=redis_url,
            nats_url=nats_url,
        )
    )
    print(f"miles: step {exported.step} of run {run_id} ({exported.dtype}) -> {exported.path}")
    print(loading_hint(exported))
    return 0
