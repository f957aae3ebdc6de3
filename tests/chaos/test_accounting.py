"""The accounting reads streams that keep whatever a fault injection published: junk next to
the run's events is skipped and counted, not raised (it once ended the audit)."""

from __future__ import annotations

import pickle
from collections import Counter

import msgspec

from miles import events
from miles.runtime.bus import DeadLetter

from .accounting import decode_dead, decode_kept

RUN = "audited"


def task(task_id: str, run_id: str = RUN) -> bytes:
    return events.encode(
        events.Task(
            run_id=run_id,
            policy_version=0,
            task_id=task_id,
            prompt="1+1=",
            label="2",
        )
    )


def test_junk_between_valid_events_is_skipped_and_counted() -> None:
    kept = [
        task("t0"),
        b"\xc1junk bytes",
        pickle.dumps({"task_id": "t9"}),
        task("t1"),
        task("t2", run_id="another-run"),
        msgspec.msgpack.encode({"task_id": "t3"}),
        task("t4"),
    ]
    skipped: Counter[str] = Counter()

    decoded = decode_kept(kept, events.Task, RUN, "tasks", skipped)

    assert [t.task_id for t in decoded] == ["t0", "t1", "t4"]
    assert skipped == Counter(
        {"tasks: not_msgpack": 1, "tasks: pickle": 1, "tasks: run_id": 1, "tasks: schema": 1}
    )


def test_junk_in_the_dead_letter_stream_is_skipped_and_counted() -> None:
    letter = DeadLetter(
        run_id=RUN,
        service="buffer",
        reason="schema",
        detail="t7",
        subject="miles.audited.samples.scored",
        payload=b"",
        time=1.0,
    )
    skipped: Counter[str] = Counter()

    letters = decode_dead([b"\xc1", msgspec.msgpack.encode(letter), b"[1]"], skipped)

    assert [d.detail for d in letters] == ["t7"]
    assert skipped == Counter({"dead: not a dead letter": 2})
