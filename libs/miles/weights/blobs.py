"""Blob stores for large payloads (policy weights): a shared directory or JetStream's Object Store.

Events carry a URI and a sha256; the payload never rides the event. ``file://`` URIs point at a
directory; ``nats-os://<bucket>/<prefix>`` at objects named ``<prefix>/<file>``. Readers verify
the weights' digest (``miles.shards.verify_weights``: every shard, however many) before they load
anything.

Names are ``<family>/<leaf>`` (``weights/v3-1a2b3c4d``, ``state/s3-1a2b3c4d``). Only the trainer
writes and deletes them (``services/trainer/collection.py`` collects old steps); everyone else
reads.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from miles.runtime.bus import ObjectBuckets
from miles.shards import ChecksumMismatch, has_weights, sha256_file, verify_weights

__all__ = [
    "BlobMissing",
    "BlobStore",
    "ChecksumMismatch",
    "DirBlobStore",
    "ObjectBlobStore",
    "sha256_file",
]


class BlobMissing(FileNotFoundError):
    """The blob a URI names is not (or no longer) in the store: collected, or never written."""


class BlobStore(Protocol):
    async def put_dir(self, local_dir: Path, name: str) -> str:
        """Store every file of ``local_dir`` under ``name`` and return the URI.

        ``local_dir`` is consumed: a directory store moves it into place instead of copying.
        """
        ...

    async def get_dir(self, uri: str, sha256: str, checked: str | None = None) -> Path:
        """A local directory holding the blob, verified against ``sha256``: its weights
        (``miles.shards``), or its one file ``checked``; ``BlobMissing`` when the store does not
        hold it."""
        ...

    def uri(self, name: str) -> str:
        """The URI ``put_dir(..., name)`` returns (whether or not it was written)."""
        ...

    async def names(self, family: str) -> list[str]:
        """The names of the blobs under ``family`` (``weights``, ``state``), whole or partly
        deleted."""
        ...

    async def delete(self, name: str) -> None:
        """Remove blob ``name`` (and any local copy this store made of it); a no-op when it is
        gone. A delete cut short leaves a partial blob that ``names`` still lists."""
        ...


class DirBlobStore:
    """A directory every process can read: local disk, NFS, a mounted bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    async def put_dir(self, local_dir: Path, name: str) -> str:
        final = self.root / name
        staging = self.root / f".{name.replace('/', '_')}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.move(local_dir, staging)  # a rename on one filesystem, a copy across two
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # readers see the whole directory or none of it
        return self.uri(name)

    def uri(self, name: str) -> str:
        return (self.root / name).as_uri()

    async def get_dir(self, uri: str, sha256: str, checked: str | None = None) -> Path:
        path = Path(urlparse(uri).path)
        if not _present(path, checked):
            raise BlobMissing(f"{uri} is not in the blob store")
        _verify(path, sha256, checked)
        return path

    async def names(self, family: str) -> list[str]:
        folder = self.root / family
        return sorted(f"{family}/{p.name}" for p in folder.iterdir()) if folder.is_dir() else []

    async def delete(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class ObjectBlobStore:
    """Object buckets on the bus (JetStream's Object Store), for clusters without a shared
    filesystem. Every object is streamed to and from a file, never held whole in memory."""

    def __init__(self, buckets: ObjectBuckets, bucket: str, cache_dir: Path) -> None:
        self.buckets = buckets
        self.bucket = bucket
        self.cache_dir = cache_dir

    async def put_dir(self, local_dir: Path, name: str) -> str:
        store = await self.buckets.objects(self.bucket)
        files = sorted(local_dir.iterdir())
        for path in files:
            with path.open("rb") as handle:
                await store.put(f"{name}/{path.name}", handle)
        listing = "\n".join(path.name for path in files).encode()
        await store.put(f"{name}/FILES", io.BytesIO(listing))
        shutil.rmtree(local_dir)
        return self.uri(name)

    def uri(self, name: str) -> str:
        return f"nats-os://{self.bucket}/{name}"

    async def get_dir(self, uri: str, sha256: str, checked: str | None = None) -> Path:
        parsed = urlparse(uri)
        name = parsed.path.lstrip("/")
        target = self.cache_dir / name
        if _present(target, checked):
            with contextlib.suppress(ChecksumMismatch, FileNotFoundError):
                _verify(target, sha256, checked)
                return target
        store = await self.buckets.objects(parsed.netloc)
        staging = self.cache_dir / f".{name.replace('/', '_')}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        listing = io.BytesIO()
        try:
            await store.get(f"{name}/FILES", listing)
        except FileNotFoundError as exc:
            raise BlobMissing(f"{uri} is not in the blob store") from exc
        for file_name in listing.getvalue().decode().split("\n"):
            with (staging / file_name).open("wb") as handle:
                await store.get(f"{name}/{file_name}", handle)
        _verify(staging, sha256, checked)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return target

    async def names(self, family: str) -> list[str]:
        store = await self.buckets.objects(self.bucket)
        return sorted({"/".join(n.split("/")[:2]) for n in await store.names(f"{family}/")})

    async def delete(self, name: str) -> None:
        """The listing first, so a reader fails at once on a blob being deleted; then every
        object under ``name``, listed or not (a put cut short before its listing)."""
        store = await self.buckets.objects(self.bucket)
        await store.delete(f"{name}/FILES")
        for object_name in await store.names(f"{name}/"):
            await store.delete(object_name)
        shutil.rmtree(self.cache_dir / name, ignore_errors=True)


def _present(directory: Path, checked: str | None) -> bool:
    return has_weights(directory) if checked is None else (directory / checked).is_file()


def _verify(directory: Path, sha256: str, checked: str | None) -> None:
    if checked is None:
        verify_weights(directory, sha256)
        return
    actual = sha256_file(directory / checked)
    if actual != sha256:
        raise ChecksumMismatch(f"{directory / checked}: sha256 {actual}, expected {sha256}")
