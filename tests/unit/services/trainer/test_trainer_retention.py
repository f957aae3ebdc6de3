"""Which old steps the trainer may delete: never the latest, the last keep_checkpoints steps,
the versions an engine may still load (max_staleness + 2) or a leased step; and, among the
files, anything of a committed step that no kept manifest names."""

from __future__ import annotations

import pytest

from services.trainer.retention import (
    Retention,
    StoredBlob,
    collectable_steps,
    garbage,
    leaf_of,
)

STEPS = range(1, 11)


@pytest.mark.parametrize(
    ("keep", "staleness", "latest", "leased", "collectable"),
    [
        (2, 0, 10, set(), [1, 2, 3, 4, 5, 6, 7, 8]),  # keeps 9, 10
        (3, 0, 10, set(), [1, 2, 3, 4, 5, 6, 7]),  # the last keep_checkpoints steps
        (1, 0, 10, set(), [1, 2, 3, 4, 5, 6, 7, 8]),  # engines may load 9 and 10 still
        (2, 3, 10, set(), [1, 2, 3, 4, 5]),  # versions 6..10 for a staleness of 3
        (2, 0, 10, {4, 9}, [1, 2, 3, 5, 6, 7, 8]),  # a lease holds 4 (9 is kept anyway)
        (2, 0, 2, set(), []),  # nothing old enough yet
        (0, 0, 10, set(), []),  # 0 keeps every step
        (2, 0, 7, set(), [1, 2, 3, 4, 5]),  # steps after the latest are never candidates
    ],
)
def test_collectable_steps(
    keep: int, staleness: int, latest: int, leased: set[int], collectable: list[int]
) -> None:
    retention = Retention(keep_checkpoints=keep, max_staleness=staleness)
    assert collectable_steps(STEPS, latest, retention, leased) == collectable


def test_the_latest_step_is_never_collectable() -> None:
    for keep in range(0, 4):
        for staleness in range(0, 3):
            retention = Retention(keep, staleness)
            for latest in STEPS:
                assert latest not in collectable_steps(STEPS, latest, retention, set())
                assert latest in retention.checkpoints_kept(latest)


def test_full_states_are_kept_for_the_last_checkpoints_only() -> None:
    assert list(Retention(2, 5).checkpoints_kept(10)) == [9, 10]
    assert list(Retention(2, 5).weights_kept(10)) == [4, 5, 6, 7, 8, 9, 10]
    assert list(Retention(3, 0).checkpoints_kept(2)) == [1, 2]


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("weights/v12-1a2b3c4d", ("weights", 12)),
        ("state/s3-ffffffff", ("state", 3)),
        ("weights/s3-ffffffff", None),  # a state leaf in the weights folder: not ours
        ("weights/.v3-x.tmp", None),
        ("other/v3-x", None),
        ("weights/vx-1", None),
    ],
)
def test_blob_names_parse(name: str, parsed: tuple[str, int] | None) -> None:
    blob = StoredBlob.parse(name)
    assert (blob and (blob.family, blob.step)) == parsed


def test_garbage_is_every_file_of_a_committed_step_no_kept_manifest_names() -> None:
    names = [
        "weights/v1-a",  # collected step
        "state/s1-a",
        "weights/v2-b",  # kept
        "weights/v2-crashed",  # an attempt at step 2 that never committed
        "state/s2-b",  # kept: the latest manifest names it (checkpoint_every = 2)
        "weights/v3-c",  # the latest
        "weights/v4-inflight",  # the next step's attempt: never touched
    ]
    stored = [blob for name in names if (blob := StoredBlob.parse(name))]
    referenced = {"v2-b", "s2-b", "v3-c"}
    assert [b.name for b in garbage(stored, 3, referenced)] == [
        "state/s1-a",
        "weights/v1-a",
        "weights/v2-crashed",
    ]


def test_leaf_of_a_uri() -> None:
    assert leaf_of("file:///runs/x/blobs/weights/v3-ab") == "v3-ab"
    assert leaf_of("nats-os://miles_x_blobs/state/s3-ab") == "s3-ab"
