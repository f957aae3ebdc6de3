"""A committed step as a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained``
loads: the step's weights in the dtype asked for, its ``config.json``, the tokenizer's files and
a ``generation_config.json``, plus ``miles_export.json`` saying which run and step it is.

The caller hands in the step's weights directory as the blob store returned it, its sha256
already verified against the manifest. Weights there are HF-named safetensors, one file or
shards and their index (``miles.shards``); they are read tensor by tensor, and the export is
written in shards of at most ``SHARD_BYTES`` (one file when it fits, as ``save_pretrained``
does), so memory holds one shard at a time. Everything is written
into a staging directory renamed into place at the end: a reader sees the whole export or none.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from miles import shards

if TYPE_CHECKING:  # torch is slow to import, and every `miles` command imports this module
    from torch import Tensor

ExportDtype = Literal["bf16", "fp16", "fp32"]
CONFIG_DTYPES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHARD_BYTES = shards.MAX_SHARD_BYTES
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


def read_tensors(directory: Path, dtype: ExportDtype) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of ``directory``'s weights, floating ones cast to ``dtype``, one at a time."""
    import torch

    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    for name, tensor in shards.iter_weights(directory):
        yield name, tensor.to(target) if tensor.is_floating_point() else tensor


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
    shards.write_weights(read_tensors(source, dtype), staging, shard_bytes)
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
