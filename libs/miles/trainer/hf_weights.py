"""A HF model's weights directory, as ``save_pretrained`` writes it (``config.json``,
``generation_config.json``, HF-named safetensors) but through ``miles.shards``, so it is sharded
by ``trainer.max_shard_bytes`` and its digest covers every shard. transformers' own sharding
writes an index that names no shard's sha256."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor
from transformers import PreTrainedModel

from miles import shards


def save_hf_weights(
    model: PreTrainedModel,
    tensors: Mapping[str, Tensor],
    directory: str | Path,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """``model``'s configs and ``tensors`` (a tied one once, as ``save_pretrained`` does) into
    ``directory``; their ``shards.weights_digest``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if model.can_generate():
        model.generation_config.save_pretrained(path)
    return shards.write_weights(
        shards.unaliased(tensors).items(), path, max_shard_bytes, metadata=metadata
    )
