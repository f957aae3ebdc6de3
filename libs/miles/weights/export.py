"""A committed step as a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained``
loads: the step's weights in the dtype asked for, its ``config.json``, the tokenizer's files and
a ``generation_config.json``, plus ``miles_export.json`` saying which run and step it is.

The caller hands in the step's weights directory as the blob store returned it, its sha256
already verified against the manifest. Weights there are HF-named safetensors, one
``model.safetensors`` or the shards a ``model.safetensors.index.json`` names; both are read
tensor by tensor, and the export is written in shards of at most ``SHARD_BYTES`` (one file when
it fits, as ``save_pretrained`` does), so memory holds one shard at a time. Everything is written
into a staging directory renamed into place at the end: a reader sees the whole export or none.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from miles.models import INDEX_FILE
from miles.weights.blobs import WEIGHTS_FILE

if TYPE_CHECKING:  # torch is slow to import, and every `miles` command imports this module
    from torch import Tensor

ExportDtype = Literal["bf16", "fp16", "fp32"]
CONFIG_DTYPES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHARD_BYTES = 5 * 1024**3
"""Largest shard written (transformers' default ``max_shard_size``)."""
MARKER = "miles_export.json"
"""Names the run, step, source sha256 and dtype; its presence marks a directory as an export,
which a new export may replace."""
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template*",
    "tokenization_*.py",
)
"""The files a tokenizer directory may hold, as transformers' tokenizers save them."""
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ExportError(ValueError):
    """An export that cannot be made, with what to do about it."""


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a HF weights directory: ``model.safetensors``, or the shards its
    index names."""
    index = directory / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    return [directory / WEIGHTS_FILE]


def read_tensors(directory: Path, dtype: ExportDtype) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of ``directory``'s weights, floating ones cast to ``dtype``, one at a time."""
    import torch
    from safetensors import safe_open

    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = weights.get_tensor(name)
                yield name, tensor.to(target) if tensor.is_floating_point() else tensor


def write_weights(tensors: Iterator[tuple[str, Tensor]], out: Path, shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and their index."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []  # each shard's tensor names; its file is named at the end
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(shard, str(out / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        (out / "shard-0.tmp").rename(out / WEIGHTS_FILE)
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i}.tmp").rename(out / file)
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def model_config(source: Path, dtype: ExportDtype) -> dict[str, Any]:
    """The step's ``config.json``, its dtype the export's."""
    config: dict[str, Any] = json.loads((source / "config.json").read_text())
    config["dtype"] = CONFIG_DTYPES[dtype]  # transformers >= 4.56; older ones read torch_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = CONFIG_DTYPES[dtype]
    return config


def generation_config(base: Path | None, config: dict[str, Any]) -> dict[str, Any]:
    """The base model's ``generation_config.json``; without one, the special token ids of the
    model's config (what transformers derives when a model has none)."""
    if base is not None and (base / "generation_config.json").is_file():
        loaded: dict[str, Any] = json.loads((base / "generation_config.json").read_text())
        return loaded
    ids = {key: config[key] for key in GENERATION_IDS if config.get(key) is not None}
    return {"_from_model_config": True, **ids}


def tokenizer_files(directory: Path) -> list[Path]:
    found = {path for pattern in TOKENIZER_FILES for path in directory.glob(pattern)}
    return sorted(path for path in found if path.is_file())


def write_model(
    source: Path,
    out: Path,
    dtype: ExportDtype,
    tokenizer: Path,
    base: Path | None,
    provenance: dict[str, Any],
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write the export of the weights in ``source`` to ``out`` and return ``out``.

    ``tokenizer``: the tokenizer's directory (``models.tokenizer_dir``), whose files are copied;
    ``base``: the base model's directory, whose ``generation_config.json`` is copied if it has
    one. ``out`` may be an earlier export (replaced), an empty directory or a new path; anything
    else is refused rather than overwritten.
    """
    if out.exists() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not a miles export: choose another --out")
    files = tokenizer_files(tokenizer)
    if not files:
        raise ExportError(f"{tokenizer} holds no tokenizer files (tokenizer.json, ...)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_weights(read_tensors(source, dtype), staging, shard_bytes)
    config = model_config(source, dtype)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = generation_config(base, config)
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for path in files:
        shutil.copy2(path, staging / path.name)
    marker = provenance | {"dtype": dtype}
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
