"""The layout of a weights directory, owned here alone: HF-named safetensors, written as one
``model.safetensors`` when they fit in ``max_shard_bytes`` and otherwise as
``model-0000i-of-0000n.safetensors`` shards with a ``model.safetensors.index.json`` (Hugging
Face's format: ``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``), which
``from_pretrained``, SGLang and vLLM all load as they are.

One digest covers a directory's weights (``weights_digest``, what manifests and ``weights``
events carry): the sha256 of the single file, or of the index, whose metadata lists every
shard's sha256 (``shard_sha256``) so the index pins every shard's bytes; ``verify_weights``
checks the digest, then each shard against the index. HF's own loaders ignore the extra key.

Everything is written deterministically (shards filled in the order the tensors come, the index
with sorted keys, safetensors' metadata reordered), so the same tensors give the same bytes and
digest: the chaos tests compare replayed steps' digests. torch and safetensors are imported
inside the functions: every ``miles`` command imports the blob store, which imports this.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3
"""Largest shard written by default (transformers' ``max_shard_size``)."""
SHARD_DIGESTS = "shard_sha256"
"""The key of the index's metadata mapping each shard file to its sha256."""
FORMAT = {"format": "pt"}
"""The metadata transformers writes into every safetensors file it saves."""


class ChecksumMismatch(ValueError):
    """Weights whose bytes are not those a digest names."""


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_weights(
    tensors: Iterable[tuple[str, Tensor]],
    directory: Path | str,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``tensors`` (no two sharing storage: see ``unaliased``) into ``directory`` and
    return their ``weights_digest``. Shards fill in the order the tensors come, a new one
    starting when the next tensor would pass ``max_shard_bytes`` (a larger tensor gets a shard
    of its own); memory holds one shard at a time when ``tensors`` is a generator.
    ``metadata`` goes into the single file's header, or the index's metadata, and is read
    back by ``weights_metadata``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []  # each shard's tensor names; its file is named at the end
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush(header: Mapping[str, str]) -> None:
        path = directory / f".shard-{len(shards)}.tmp"
        save_file(shard, str(path), metadata=dict(header))
        _sort_metadata(path)
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush(FORMAT)
            size = 0
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if not shards:
        flush({**FORMAT, **(metadata or {})})
        (directory / ".shard-0.tmp").rename(directory / WEIGHTS_FILE)
        _remove_stale(directory, keep={WEIGHTS_FILE})
        return sha256_file(directory / WEIGHTS_FILE)
    flush(FORMAT)
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        (directory / f".shard-{number - 1}.tmp").rename(directory / file)
        weight_map |= dict.fromkeys(names, file)
        digests[file] = sha256_file(directory / file)
    index = {
        "metadata": {**(metadata or {}), "total_size": total, SHARD_DIGESTS: digests},
        "weight_map": weight_map,
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _remove_stale(directory, keep={INDEX_FILE, *digests})
    return sha256_file(directory / INDEX_FILE)


def unaliased(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each storage once, under its first name (safetensors refuses aliases): a tied
    ``lm_head.weight`` is left out, as ``save_pretrained`` does, and loaders tie it back."""
    seen: set[int] = set()
    kept = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        if storage not in seen:
            seen.add(storage)
            kept[name] = tensor
    return kept


def has_weights(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file() or (directory / WEIGHTS_FILE).is_file()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a weights directory: ``model.safetensors``, or the shards its
    index names, in order."""
    index = directory / INDEX_FILE
    if index.is_file():
        return [directory / shard for shard in sorted(set(_weight_map(directory).values()))]
    return [directory / WEIGHTS_FILE]


def weights_digest(directory: Path) -> str:
    """The sha256 that names ``directory``'s weights: of the index when sharded, else of
    ``model.safetensors``."""
    index = directory / INDEX_FILE
    return sha256_file(index if index.is_file() else directory / WEIGHTS_FILE)


def verify_weights(directory: Path, sha256: str) -> None:
    """``ChecksumMismatch`` unless ``directory``'s weights are those ``sha256`` names: its
    digest, then every shard against the digest its index records."""
    actual = weights_digest(directory)
    if actual != sha256:
        raise ChecksumMismatch(f"{directory}: weights sha256 {actual}, expected {sha256}")
    if not (directory / INDEX_FILE).is_file():
        return
    index = json.loads((directory / INDEX_FILE).read_text())
    recorded: dict[str, str] = index["metadata"].get(SHARD_DIGESTS, {})
    for path in weight_files(directory):
        if path.name not in recorded:
            raise ChecksumMismatch(f"{directory / INDEX_FILE} records no sha256 for {path.name}")
        shard = sha256_file(path)
        if shard != recorded[path.name]:
            raise ChecksumMismatch(
                f"{path}: sha256 {shard}, its index records {recorded[path.name]}"
            )


def weights_metadata(directory: Path) -> dict[str, str]:
    """The ``metadata`` ``write_weights`` was given (and safetensors' ``format``)."""
    index = directory / INDEX_FILE
    if index.is_file():
        found = json.loads(index.read_text())["metadata"]
        return {key: value for key, value in found.items() if isinstance(value, str)}
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
        return dict(weights.metadata() or {})


def read_weights(directory: Path | str, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of ``directory``'s weights, whole."""
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for path in weight_files(Path(directory)):
        tensors |= load_file(path, device=device)
    return tensors


@contextlib.contextmanager
def open_weights(directory: Path | str) -> Iterator[Callable[[str], Tensor]]:
    """A getter of one tensor by name, each read from its file lazily (``safe_open``)."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / INDEX_FILE
    weight_map = _weight_map(directory) if index.is_file() else {}
    with contextlib.ExitStack() as stack:
        handles = {
            path.name: stack.enter_context(safe_open(str(path), framework="pt"))
            for path in weight_files(directory)
        }

        def get(name: str) -> Tensor:
            return handles[weight_map.get(name, WEIGHTS_FILE)].get_tensor(name)

        yield get


def iter_weights(directory: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of ``directory``'s weights, one at a time (one file open at a time)."""
    from safetensors import safe_open

    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, weights.get_tensor(name)


def load_module(module: Any, directory: Path | str, device: str = "cpu") -> None:
    """Copy ``directory``'s weights into ``module``'s parameters in place; a parameter may be
    missing from the files only when it shares storage with one that is not (a tied head)."""
    state = read_weights(directory, device)
    live = module.state_dict()
    missing, unexpected = module.load_state_dict(state, strict=False)
    loaded = {live[name].untyped_storage().data_ptr() for name in state if name in live}
    untied = [name for name in missing if live[name].untyped_storage().data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(
            f"{directory} does not match the model: missing {sorted(untied)}, "
            f"unexpected {sorted(unexpected)}"
        )


def _weight_map(directory: Path) -> dict[str, str]:
    weight_map: dict[str, str] = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    return weight_map


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """Weights files of an earlier write into the same directory, which a loader globbing
    ``*.safetensors`` would otherwise mix in."""
    for path in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys in order. safetensors
    serialises the metadata from a Rust HashMap, whose order changes from one call to the next:
    the same weights would get other bytes, and another sha256 than a replayed step's. Same keys,
    values and length (the header is padded with spaces): only the order moves."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        if len(header.get("__metadata__", {})) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: the reordered header outgrew its {size} bytes")
        handle.seek(8)
        handle.write(text.ljust(size))
