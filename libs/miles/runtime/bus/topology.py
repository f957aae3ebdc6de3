"""The streams and durable consumers of one run, whichever broker holds them."""

from __future__ import annotations

from dataclasses import dataclass

from miles.runtime.subjects import (
    BUFFER_CONSUMER,
    COORDINATOR_CONSUMER,
    REWARD_CONSUMER,
    ROLLOUT_CONSUMER,
    TRAINER_CONSUMER,
    Subjects,
)

DEDUPE_WINDOW_SECONDS = 300.0
"""Longer than the longest publish retry (``NatsBus.publish`` gives up after ~60 s)."""


@dataclass(frozen=True)
class StreamSpec:
    kind: str
    subjects: tuple[str, ...]
    work_queue: bool


@dataclass(frozen=True)
class ConsumerSpec:
    stream_kind: str
    durable: str
    ack_wait: float
    max_ack_pending: int


def topology(
    subjects: Subjects, ack_wait: float = 6.0
) -> tuple[list[StreamSpec], list[ConsumerSpec]]:
    """The streams and durable consumers of one run.

    AckWait is short: a consumer that dies holding messages has them redelivered to a restarted
    (or another) replica within seconds. Live consumers send ``in_progress`` during long work.
    """
    s = subjects
    streams = [
        # Tasks are kept after they are acked (limits, not work-queue, retention): the stream is
        # the run's record of what the coordinator dispatched and JetStream acknowledged, which
        # the chaos tests' accounting and an operator's audit read back.
        StreamSpec("tasks", (s.tasks,), work_queue=False),
        StreamSpec("generated", (s.generated,), work_queue=True),
        StreamSpec("scored", (s.scored,), work_queue=True),
        StreamSpec("batches", (s.batches,), work_queue=True),
        # The coordinator's inbox: step commits, filtered groups and eval results.
        StreamSpec("ledger", (s.steps, s.filtered, s.eval_scored), work_queue=False),
        # Every rollout replica reads the latest weights event: not a queue.
        StreamSpec("weights", (s.weights,), work_queue=False),
        StreamSpec("dead", (s.dead(),), work_queue=False),
    ]
    consumers = [
        ConsumerSpec("tasks", ROLLOUT_CONSUMER, ack_wait, max_ack_pending=1024),
        ConsumerSpec("generated", REWARD_CONSUMER, ack_wait, max_ack_pending=1024),
        # The buffer holds groups unacked until the batch that uses them is published.
        ConsumerSpec("scored", BUFFER_CONSUMER, ack_wait, max_ack_pending=4096),
        ConsumerSpec("batches", TRAINER_CONSUMER, ack_wait, max_ack_pending=4),
        ConsumerSpec("ledger", COORDINATOR_CONSUMER, ack_wait, max_ack_pending=4096),
    ]
    return streams, consumers
