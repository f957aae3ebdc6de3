"""Weight sync: seconds and bytes/s to move a ~100M-parameter policy from trainer to engine.

Every path ends with the engine (the local SGLang-compatible server, `miles.engine.sglang_server`,
a separate process spoken to over SGLang's HTTP API) holding the new weights, verified:

- disk:        trainer writes safetensors (HF names) -> directory blob store (rename) -> sha256
               check -> engine `/update_weights_from_disk`
- object store: the same files through the JetStream Object Store (upload, then a streamed
               download with `writeinto`, sha256 check) -> `/update_weights_from_disk`
- distributed: `/init_weights_update_group` once, then per sync `/update_weights_from_distributed`
               with a gloo broadcast of every tensor from trainer rank 0 (NCCL on GPUs), then
               the engine's per-tensor checksums compared with the trainer's
- tensor:      `/update_weights_from_tensor` with handles to the trainer's shared memory (the
               colocated path; CUDA IPC handles on GPUs, not measured here): the engine maps
               the segments and copies them into its model, then checksums as above

Baseline: writing the same safetensors file to local disk, in the same process. Prints a table
with ratios and writes benchmarks/results/bench_weight_sync.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from miles.engine.sglang_client import SGLangClient, broadcast_weights, join_weight_update_group
from miles.engine.sglang_launcher import SGLangServerProcess
from miles.engine.sglang_server import tensor_checksum
from miles.engine.shared_tensors import serialize_named_tensors
from miles.runtime import embedded
from miles.weights.blobs import BlobStore, DirBlobStore, ObjectBlobStore, sha256_file

ROOT = Path(__file__).parents[1]


def build_model(directory: Path) -> LlamaForCausalLM:
    """~100M parameters, Llama-shaped (GQA, tied embeddings), random weights, no download."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    sys.path.insert(0, str(ROOT / "examples" / "addition"))
    import task  # type: ignore[import-not-found]  # the demo's offline tokenizer: no download

    task.build_tokenizer(directory)
    return model


def perturb(model: LlamaForCausalLM, version: int) -> None:
    """A new policy version: every weight changes, as after an optimizer step."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-4 * version)


async def timed(repeats: int, sync: Callable[[int], Awaitable[None]]) -> list[float]:
    seconds = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        await sync(version)
        seconds.append(time.perf_counter() - start)
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="miles-wsync-") as tmp:
        work = Path(tmp)
        model = build_model(work / "base")
        params = sum(p.numel() for p in model.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        print(f"model: {params / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB of fp32 state")

        async def local_disk(version: int) -> None:
            model.save_pretrained(str(work / f"local-{version}"))

        server = SGLangServerProcess("local", work / "base", log_path=work / "server.log")
        nats = embedded.start_nats(work / "nats")
        results: dict[str, list[float]] = {}
        try:
            base_url = await asyncio.to_thread(server.start)
            engine = SGLangClient(base_url)
            results["local disk write (baseline)"] = await timed(args.repeats, local_disk)

            def through(store: BlobStore) -> Callable[[int], Awaitable[None]]:
                """Trainer writes, the store carries (sha256-checked), the engine loads."""

                async def sync(version: int) -> None:
                    perturb(model, version)
                    staging = work / f"staging-{id(store)}-{version}"
                    model.save_pretrained(str(staging))
                    sha = sha256_file(staging / "model.safetensors")
                    uri = await store.put_dir(staging, f"weights/v{version}")
                    path = await store.get_dir(uri, sha)
                    await engine.update_weights_from_disk(str(path), version)

                return sync

            disk = through(DirBlobStore(work / "blobs"))
            results["disk (shared directory)"] = await timed(args.repeats, disk)

            import nats as nats_py

            nc = await nats_py.connect(nats.url)
            objects = ObjectBlobStore(nc.jetstream(timeout=60), "wsync", work / "cache")
            results["JetStream Object Store"] = await timed(args.repeats, through(objects))
            await nc.close()

            group = await join_weight_update_group(
                [engine], "127.0.0.1", embedded.free_port(), "bench", backend="gloo"
            )
            # Tied embeddings: the engine holds lm_head as the embedding, so send unique storage.
            named = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
            named.pop("lm_head.weight", None)

            async def verify() -> None:
                live = await engine._call("GET", "/miles/weights_checksum", None, idempotent=True)
                checksums = json.loads(live)["checksums"]
                sent = {n: tensor_checksum(t) for n, t in named.items()}
                wrong = [n for n, c in sent.items() if checksums.get(n) != c]
                if wrong:
                    raise RuntimeError(f"engine weights differ after the sync: {wrong[:3]}")

            async def distributed(version: int) -> None:
                perturb(model, version)
                await broadcast_weights([engine], group, named, "bench", version)
                await verify()

            results["gloo broadcast (distributed path)"] = await timed(args.repeats, distributed)

            async def shared(version: int) -> None:
                perturb(model, version)
                payload = serialize_named_tensors(named)
                await engine.update_weights_from_tensor([payload], version)
                await verify()

            results["shared-memory handles (tensor path)"] = await timed(args.repeats, shared)
            await engine.aclose()
        finally:
            server.stop()
            nats.stop()

    baseline = statistics.median(results["local disk write (baseline)"])
    rows = {
        name: {
            "seconds_median": round(statistics.median(times), 3),
            "bytes_per_second": round(nbytes / statistics.median(times)),
            "over_local_disk_write": round(statistics.median(times) / baseline, 2),
            "samples": [round(t, 3) for t in times],
        }
        for name, times in results.items()
    }
    print(f"\n{'path':<36}{'s/sync':>8}{'MB/s':>9}{'x disk write':>14}")
    for name, row in rows.items():
        print(
            f"{name:<36}{row['seconds_median']:>8.2f}{row['bytes_per_second'] / 1e6:>9.0f}"
            f"{row['over_local_disk_write']:>13.2f}x"
        )
    print("tensor path on GPUs: CUDA IPC handles instead of shared memory, not measured here")
    out = Path(__file__).parent / "results" / "bench_weight_sync.json"
    out.parent.mkdir(exist_ok=True)
    report = {"parameters": params, "bytes": nbytes, "paths": rows}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
