"""Reading back what wandb wrote offline: the ``run-<id>.wandb`` file's history rows.

The file is wandb's transaction log: a 7-byte header (``:W&B``, a magic number, a version),
then 32 KiB blocks of records, each ``crc32 (4) | length (2, little-endian) | type (1) | data``
with types full / first / middle / last for records split across blocks (LevelDB's log
format). Each record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    found, pending, offset = [], b"", HEADER
    while offset + 7 <= len(data):
        block_left = BLOCK - offset % BLOCK
        if block_left < 7:  # the block's tail is padding
            offset += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        body = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = body if kind in (FULL, FIRST) else pending + body
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row wandb logged under ``run_dir`` (its ``wandb/`` directory), in order."""
    (log,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    rows = []
    for record in records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
