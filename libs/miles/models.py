"""Where a model and its tokenizer are on this machine: ``model.path`` is a local Hugging Face
directory or a hub id already in the local Hugging Face cache. miles never downloads a model:
a run on a cluster should not depend on the hub being up, and every node must load the same
bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from miles import shards
from miles.config import MilesConfig, ModelConfig

if TYPE_CHECKING:  # transformers is slow to import
    from transformers import PreTrainedTokenizerBase

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class ModelError(ValueError):
    """A model or tokenizer that cannot be found or read, with what to fix."""


def local_dir(path: Path | str, what: str = "model.path") -> Path:
    """``path`` itself when it is a directory, else the snapshot of hub id ``path`` in the
    local Hugging Face cache."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if candidate.exists():
        raise ModelError(f"{what}: {candidate} is a file; give the model's directory")
    name = str(path)
    if candidate.is_absolute() or name.startswith(".") or name.count("/") > 1:
        raise ModelError(f"{what}: {candidate} does not exist")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, a malformed id (HFValidationError)...
        raise ModelError(
            f"{what}: {name} is neither a directory nor a model in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); download it first (`hf download {name}`) or "
            "give its directory"
        ) from exc


def model_problems(directory: Path, what: str = "model.path") -> list[str]:
    """What keeps ``directory`` from loading as a model: no config, or missing weights (every
    shard an index names must be there)."""
    if not (directory / "config.json").is_file():
        return [f"{what}: {directory} has no config.json: not a Hugging Face model directory"]
    if shards.has_weights(directory):  # one file, or an index of shards
        missing = [path.name for path in shards.weight_files(directory) if not path.is_file()]
        if missing:
            return [f"{what}: {directory} lacks shards its index names: {', '.join(missing)}"]
        return []
    if not any(next(directory.glob(p), None) for p in WEIGHT_PATTERNS):
        return [f"{what}: {directory} has no weights (*.safetensors)"]
    return []


def resolve(config: MilesConfig) -> MilesConfig:
    """``config`` with ``model.path`` and ``model.tokenizer_path`` as local directories, so
    every service (and its log) names the same files."""
    model = config.model
    if model.path is not None:
        model.path = local_dir(model.path)
    if model.tokenizer_path is not None:
        model.tokenizer_path = local_dir(model.tokenizer_path, "model.tokenizer_path")
    return config


def tokenizer_dir(model: ModelConfig) -> Path:
    source = model.tokenizer_path or model.path
    if source is None:
        raise ModelError("model.path is not set: point it at a Hugging Face model directory")
    return local_dir(source, "model.tokenizer_path" if model.tokenizer_path else "model.path")


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    directory = tokenizer_dir(model)
    try:
        return AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=model.trust_remote_code
        )
    except Exception as exc:  # OSError, ValueError, a missing tokenizer class...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load a tokenizer from {directory}: {first}") from exc


def pretrained_kwargs(model: ModelConfig) -> dict[str, Any]:
    """What every ``from_pretrained`` of the policy passes."""
    return {"local_files_only": True, "trust_remote_code": model.trust_remote_code}
