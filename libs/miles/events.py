"""The wire contract: every event that crosses a service boundary.

Events are msgspec Structs encoded as msgpack. Every event carries the schema version, the
``run_id``, a stable id and the ``policy_version`` it was produced under. A tagged union lets one
decoder reject anything that is not a known event of the expected type; pickle is never used.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

SCHEMA_VERSION = 1
"""Bumped on any incompatible change; consumers dead-letter events of another version."""

Split = Literal["train", "eval"]
FinishReason = Literal["stop", "length", "abort"]


class Event(msgspec.Struct, kw_only=True, tag_field="kind", forbid_unknown_fields=False):
    """Fields every event carries."""

    schema: int = SCHEMA_VERSION
    run_id: str
    policy_version: int


class Task(Event, tag="task"):
    """A prompt group to generate: ``group_size`` samples of one prompt."""

    task_id: str
    prompt: str
    """The text the engine continues: the row's prompt, or its chat ``messages`` rendered with
    the tokenizer's chat template (generation prompt included)."""
    label: Any = ""
    """The row's ``data.label_key`` column, with its type (a string, a number, a list...)."""
    metadata: dict[str, Any] = {}
    """The row's other columns, typed, for the reward (TRL passes them as keyword arguments)."""
    messages: list[dict[str, Any]] = []
    """The row's chat messages when it had them (``[{role, content}]``), for custom rollouts."""
    split: Split = "train"
    group_size: int = 1
    seed: int = 0
    greedy: bool = False
    eval_round: int = -1
    """For eval tasks, the step after which the evaluation runs."""


class Turn(msgspec.Struct, kw_only=True):
    """One turn of a multi-turn sample: response tokens ``[start, end)`` and who wrote them."""

    role: str
    """``assistant`` for the policy's own tokens; ``tool``, ``user`` or ``environment`` else."""
    start: int
    end: int
    trained: bool
    """Whether the loss sees these tokens: the policy's turns only."""
    text: str = ""


class Sample(msgspec.Struct, kw_only=True):
    """One generated completion with everything the trainer needs to score and learn from it."""

    sample_id: str
    prompt: str
    label: Any
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    response_text: str
    finish_reason: FinishReason
    policy_version_first: int
    policy_version_last: int
    reward: float = 0.0
    failed: bool = False
    error: str = ""
    metadata: dict[str, Any] = {}
    """The task's row columns, for the reward."""
    loss_mask: list[int] = []
    """Per response token, 1 when the loss trains it and 0 for tokens the policy did not write
    (a tool's output, an environment's reply); empty: every response token is trained."""
    turns: list[Turn] = []
    """A multi-turn sample's turns, in order (empty for a single completion)."""


class GeneratedGroup(Event, tag="generated"):
    """The samples of one task, as produced by a rollout replica."""

    task_id: str
    split: Split
    eval_round: int
    samples: list[Sample]
    engine: str = ""
    generate_seconds: float = 0.0


class ScoredGroup(Event, tag="scored"):
    """A generated group after the reward service set ``reward`` (or ``failed``) per sample."""

    task_id: str
    split: Split
    eval_round: int
    samples: list[Sample]
    score_seconds: float = 0.0


class TrainSample(msgspec.Struct, kw_only=True):
    """A sample as the trainer consumes it: tokens, behaviour logprobs and its advantage."""

    sample_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    advantage: float
    reward: float
    policy_version: int
    loss_mask: list[int] = []
    """As ``Sample.loss_mask``: empty trains every response token."""
    turns: list[Turn] = []
    """As ``Sample.turns``, without their text: the step's manifest counts them per role."""


def trained_tokens(sample: Sample | TrainSample) -> int:
    """The response tokens the loss trains: the policy's own, not a tool's or a user's."""
    return sum(sample.loss_mask) if sample.loss_mask else len(sample.response_ids)


class Batch(Event, tag="batch"):
    """``groups`` prompt groups with their advantages, ready for one optimizer step."""

    batch_id: str
    task_ids: list[str]
    samples: list[TrainSample]
    traceparents: list[str] = []
    """W3C ``traceparent`` of each group's trace (in ``task_ids`` order, where tracing was on):
    a batch gathers many traces, so the trainer's step links to them instead of joining one.
    Optional, so batches from before it existed still decode."""
    samples_uri: str = ""
    """Where the samples are when the batch is too large for an event
    (``buffer.inline_batch_bytes``): ``samples`` is then empty (``miles.weights.batches``)."""
    samples_sha256: str = ""


class GroupFiltered(Event, tag="filtered"):
    """The buffer dropped a group (zero variance, stale, failed); the coordinator refills."""

    task_id: str
    reason: str


class WeightsPublished(Event, tag="weights"):
    """New policy weights: safetensors with HF names at ``uri``."""

    uri: str
    sha256: str
    step: int


class StepCommitted(Event, tag="step"):
    """The trainer committed ``step``; ``policy_version`` is the version it produced."""

    step: int
    batch_id: str
    task_ids: list[str]
    sample_ids: list[str]
    reward_mean: float
    loss: float
    grad_norm: float
    kl: float
    seconds: dict[str, float] = {}


class Control(Event, tag="control"):
    """An operator or coordinator command to every service of the run: ``stop`` now; ``pause``
    and ``resume`` the coordinator's dispatching; ``drain``: dispatch only what completes the
    steps in flight, then stop at that committed step (resumable)."""

    command: Literal["stop", "pause", "resume", "drain"]
    reason: str = ""


class Heartbeat(Event, tag="heartbeat"):
    """Liveness and utilisation of one service instance."""

    service: str
    instance: str
    pid: int
    time: float
    busy_seconds: float
    wait_seconds: float
    processed: int
    metrics_port: int = 0
    """Where this instance serves Prometheus ``/metrics`` (0: it does not)."""
    metrics: dict[str, float] = {}
    """The values its ``/metrics`` exports now, keyed like the exposition without ``run_id``
    and ``service`` (``miles_bleed_ratio{side="trainer_waiting_for_data"}``): what `miles
    status`, the live view and ``summary.json`` read, so they agree with Prometheus."""


class EngineFlagged(Event, tag="engine_flagged"):
    """A rollout engine found straggling: far under its fleet's median throughput."""

    engine: str
    tokens_per_second: float
    fleet_median: float
    action: str


AnyEvent = (
    Task
    | GeneratedGroup
    | ScoredGroup
    | Batch
    | GroupFiltered
    | WeightsPublished
    | StepCommitted
    | Control
    | Heartbeat
    | EngineFlagged
)

E = TypeVar("E", bound=Event)
Expected = type[E] | tuple[type[E], ...]
"""What a consumer accepts: one event type, or a few (the coordinator's inbox takes three)."""

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[AnyEvent] = msgspec.msgpack.Decoder(AnyEvent)


BAD_EVENT_REASONS = ("pickle", "schema", "not_msgpack", "schema_version", "run_id", "type")
"""Every ``BadEvent.reason`` that ``decode`` gives."""


class BadEvent(ValueError):
    """An event that cannot be accepted; ``reason`` is a short machine-readable label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes, expected: Expected[E], run_id: str) -> E:
    """Decode and validate one event; raise ``BadEvent`` with a reason otherwise. A known event
    of another type is refused too (``type``): a consumer sees only what it expects."""
    if data[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO: refuse without unpickling
        raise BadEvent("pickle", "pickle payloads are never accepted")
    try:
        event = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadEvent("schema", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise BadEvent("not_msgpack", str(exc)) from exc
    if event.schema != SCHEMA_VERSION:
        raise BadEvent("schema_version", f"got {event.schema}, speak {SCHEMA_VERSION}")
    if event.run_id != run_id:
        raise BadEvent("run_id", f"event for run {event.run_id!r} reached run {run_id!r}")
    if not isinstance(event, expected):
        raise BadEvent("type", f"expected {_names(expected)}, got {type(event).__name__}")
    return event


def _names(expected: Expected[E]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(kind.__name__ for kind in kinds)
