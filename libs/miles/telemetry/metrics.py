"""Prometheus metrics of one miles process, in its own registry, served on ``/metrics``.

Conventions: every name starts with ``miles_``; base units (seconds, bytes) are suffixes;
counters end in ``_total``; ratios are 0..1. Every metric carries ``run_id`` and ``service``;
the labels listed below come on top. This list is the source for the docs.

Progress
- ``miles_policy_version``: the newest policy version this process knows of.
- ``miles_step``: the last step this process saw committed.
- ``miles_steps_committed_total``: steps committed.
- ``miles_last_step_timestamp_seconds``: Unix time of the last committed step.
- ``miles_step_duration_seconds``: histogram of wall time per trainer step.
- ``miles_tasks_published_total``: prompt groups the coordinator put on the task queue.
- ``miles_samples_generated_total{engine}``: completions generated.
- ``miles_tokens_generated_total{engine}``: response tokens generated.
- ``miles_samples_scored_total``: completions scored.
- ``miles_groups_received_total``: scored groups the buffer received.
- ``miles_batches_published_total``: training batches the buffer published.

Learning signals
- ``miles_reward{reward_fn}``: histogram of rewards per reward function (buckets fit [-1, 1]).
  Its buckets go below 0, so prometheus-client exports no ``_sum`` (OpenMetrics forbids a
  sum that can fall); the mean comes from ``miles_reward_running_sum`` instead.
- ``miles_reward_running_sum{reward_fn}``: the sum of every reward observed, a gauge (it falls
  with negative rewards): the mean over a window is ``delta(running_sum) / increase(count)``.
- ``miles_groups_filtered_total{reason}``: groups dropped (zero_variance, stale, failed, ...).
- ``miles_train_loss``, ``miles_train_kl``, ``miles_train_entropy``, ``miles_train_grad_norm``:
  the last step's loss, KL to the reference, token entropy and gradient norm.
- ``miles_train_clip_fraction``: share of tokens whose ratio the clip bit in the last step.
- ``miles_train_mismatch_kl``, ``miles_train_mismatch_weight_mean``,
  ``miles_train_mismatch_weight_max``, ``miles_train_mismatch_masked_ratio``: the train/inference
  mismatch of the last step (k3 KL between the trainer's and the engine's logprobs, the mean and
  largest ratio pi_trainer / pi_engine, the share of tokens masked importance sampling dropped).
- ``miles_train_learning_rate``: the policy's learning rate in the last step (the schedule's).

Off-policy lag
- ``miles_sample_staleness``: histogram of trainer version minus a sample's policy version.
- ``miles_buffer_depth``: prompt groups the buffer holds that no batch used yet.

Time breakdown
- ``miles_phase_seconds_total{phase}``: wall seconds spent in each phase (see ``Phase``).
- ``miles_phase_cpu_seconds_total{phase}``: process CPU seconds (all threads) during each phase.
- ``miles_phase_gpu_utilisation_ratio{phase,gpu}``: NVML utilisation at the end of the phase
  (only where nvidia-ml-py and a GPU are present).
- ``miles_bleed_ratio{side}``: time waiting over wall time; ``side`` is
  ``trainer_waiting_for_data`` or ``rollout_waiting_for_weights``.

Engines
- ``miles_engine_tokens_per_second{engine}``: an engine's recent generation throughput.
- ``miles_engine_straggler{engine}``: 1 while an engine is flagged as a straggler, else 0.

Bus and resources
- ``miles_consumer_pending_messages{stream,consumer}``: messages not yet delivered.
- ``miles_consumer_ack_pending_messages{stream,consumer}``: delivered, not yet acked.
- ``miles_consumer_redelivered_messages{stream,consumer}``: redelivered, not yet acked.
- ``miles_dead_letters_total{reason}``: inputs rejected to the dead-letter subject.
- ``miles_restarts_total{restarted_service}``: restarts of a service seen by this process.
- ``miles_process_cpu_seconds_total``, ``miles_process_resident_memory_bytes``, ...:
  prometheus-client's process collector (Linux), under the ``miles_`` namespace.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

Phase = Literal[
    "rollout",  # generating a group (rollout)
    "reward",  # scoring a group (reward)
    "buffer_wait",  # the trainer waiting for a batch
    "train_forward_backward",
    "optimizer",
    "weight_publish",  # the trainer saving and announcing weights
    "weight_wait",  # rollout held back by the staleness bound, waiting for newer weights
    "weight_load",  # rollout engines loading new weights
    "checkpoint",
]
BleedSide = Literal["trainer_waiting_for_data", "rollout_waiting_for_weights"]

BASE_LABELS = ("run_id", "service")
REWARD_BUCKETS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Inclusive upper bounds: binary rewards land exactly on 0 and 1, graded ones in between."""
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32)
STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

M = TypeVar("M", Counter, Gauge, Histogram)


class Family(Generic[M]):
    """A labelled metric with ``run_id`` and ``service`` bound: ``family.labels(reason=...)``."""

    def __init__(self, metric: M, bound: dict[str, str], label_names: tuple[str, ...] = ()) -> None:
        self._metric: M = metric
        self._bound = bound
        self.label_names = label_names
        """The labels ``labels`` takes."""

    def labels(self, **labels: str) -> M:
        return self._metric.labels(**self._bound, **labels)


class LazyGauge:
    """One gauge of this process, created (and so exported) by its first ``set``."""

    def __init__(self, family: Family[Gauge]) -> None:
        self._family = family

    def set(self, value: float) -> None:
        self._family.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._family.labels().inc(amount)


TRAIN_SIGNALS = (
    ("clip_frac", "clip_fraction", "share of tokens the clip bit in the last step"),
    ("mismatch_kl", "mismatch_kl", "k3 KL between trainer and engine logprobs, last step"),
    ("mismatch_ratio_mean", "mismatch_weight_mean", "mean pi_trainer / pi_engine, last step"),
    ("mismatch_ratio_max", "mismatch_weight_max", "largest pi_trainer / pi_engine, last step"),
    ("mismatch_masked", "mismatch_masked_ratio", "share of tokens MIS dropped, last step"),
    ("lr", "learning_rate", "the policy's learning rate in the last step (the schedule's)"),
)
"""Step metrics exported as gauges: (StepMetrics key, metric name without prefix, help)."""


class Metrics:
    """Every metric of one process, registered in ``registry`` (never the global one)."""

    def __init__(self, service: str, run_id: str) -> None:
        self.registry = CollectorRegistry()
        self._bound = {"run_id": run_id, "service": service}
        self.registry.register(
            _Labelled(ProcessCollector(namespace="miles", registry=None), self._bound)
        )
        self._gpus = _Nvml.open()

        # Progress
        self.policy_version = self._gauge("miles_policy_version", "newest policy version")
        self.step = self._gauge("miles_step", "last committed step")
        self.steps_committed = self._one(Counter, "miles_steps_committed_total", "steps committed")
        self.last_step_timestamp = self._gauge(
            "miles_last_step_timestamp_seconds", "Unix time of the last committed step"
        )
        self.step_duration = self._one(
            Histogram, "miles_step_duration_seconds", "wall time per step", buckets=STEP_BUCKETS
        )
        self.tasks_published = self._one(
            Counter, "miles_tasks_published_total", "prompt groups put on the task queue"
        )
        self.samples_generated = self._by(
            Counter, "miles_samples_generated_total", "completions generated", "engine"
        )
        self.tokens_generated = self._by(
            Counter, "miles_tokens_generated_total", "response tokens generated", "engine"
        )
        self.samples_scored = self._one(Counter, "miles_samples_scored_total", "completions scored")
        self.groups_received = self._one(
            Counter, "miles_groups_received_total", "scored groups the buffer received"
        )
        self.batches_published = self._one(
            Counter, "miles_batches_published_total", "training batches published"
        )

        # Learning signals
        self.reward = self._by(
            Histogram, "miles_reward", "reward per sample", "reward_fn", buckets=REWARD_BUCKETS
        )
        self.reward_running_sum = self._by(
            Gauge,
            "miles_reward_running_sum",
            "sum of every reward observed (falls with negative rewards: use delta, not rate)",
            "reward_fn",
        )
        self.groups_filtered = self._by(
            Counter, "miles_groups_filtered_total", "groups dropped by the buffer", "reason"
        )
        self.train_loss = self._gauge("miles_train_loss", "last step's loss")
        self.train_kl = self._gauge("miles_train_kl", "last step's KL to the reference")
        self.train_entropy = self._gauge("miles_train_entropy", "last step's entropy")
        self.train_grad_norm = self._gauge("miles_train_grad_norm", "last step's gradient norm")
        self.train_signals = {
            key: self._gauge(f"miles_train_{name}", help_text)
            for key, name, help_text in TRAIN_SIGNALS
        }

        # Off-policy lag
        self.sample_staleness = self._one(
            Histogram,
            "miles_sample_staleness",
            "trainer policy version minus the sample's policy version",
            buckets=STALENESS_BUCKETS,
        )
        self.buffer_depth = self._gauge("miles_buffer_depth", "prompt groups held")

        # Time breakdown
        self.phase_seconds = self._by(
            Counter, "miles_phase_seconds_total", "wall seconds per phase", "phase"
        )
        self.phase_cpu_seconds = self._by(
            Counter, "miles_phase_cpu_seconds_total", "process CPU seconds per phase", "phase"
        )
        self.phase_gpu_utilisation = self._by(
            Gauge,
            "miles_phase_gpu_utilisation_ratio",
            "NVML GPU utilisation at the end of a phase",
            "phase",
            "gpu",
        )
        self.bleed_ratio = self._by(
            Gauge, "miles_bleed_ratio", "time waiting over wall time", "side"
        )
        for phase in get_args(Phase):  # exported as 0 from the start: increase() sees them all
            self.phase_seconds.labels(phase=phase)
            self.phase_cpu_seconds.labels(phase=phase)

        # Engines
        self.engine_tokens_per_second = self._by(
            Gauge, "miles_engine_tokens_per_second", "recent generation throughput", "engine"
        )
        self.engine_straggler = self._by(
            Gauge, "miles_engine_straggler", "1 while flagged as a straggler", "engine"
        )

        # Bus and resources
        self.consumer_pending = self._by(
            Gauge,
            "miles_consumer_pending_messages",
            "JetStream messages not yet delivered",
            "stream",
            "consumer",
        )
        self.consumer_ack_pending = self._by(
            Gauge,
            "miles_consumer_ack_pending_messages",
            "JetStream messages delivered and not yet acked",
            "stream",
            "consumer",
        )
        self.consumer_redelivered = self._by(
            Gauge,
            "miles_consumer_redelivered_messages",
            "JetStream messages redelivered and not yet acked",
            "stream",
            "consumer",
        )
        self.dead_letters = self._by(
            Counter, "miles_dead_letters_total", "inputs dead-lettered", "reason"
        )
        self.restarts = self._by(
            Counter, "miles_restarts_total", "service restarts observed", "restarted_service"
        )

    def _one(self, kind: type[M], name: str, doc: str, **options: Any) -> M:
        """A counter or histogram, exported from the start: 0 is true of every process."""
        metric = kind(name, doc, BASE_LABELS, registry=self.registry, **options)
        return metric.labels(**self._bound)

    def _gauge(self, name: str, doc: str) -> LazyGauge:
        """A gauge exported once set: a reward process must not say ``miles_train_loss 0``
        (or ``max(miles_train_loss)`` would read 0 whatever the trainer says)."""
        return LazyGauge(Family(Gauge(name, doc, BASE_LABELS, registry=self.registry), self._bound))

    def _by(self, kind: type[M], name: str, doc: str, *labels: str, **options: Any) -> Family[M]:
        metric = kind(name, doc, (*BASE_LABELS, *labels), registry=self.registry, **options)
        return Family(metric, self._bound, labels)

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Count the block's wall and process CPU seconds (and GPU utilisation) under ``phase``.

        Process CPU covers every thread: in an event loop running overlapping phases, each
        phase is charged the CPU of all of them. ``rate(cpu) / rate(wall)`` is cores busy.
        """
        wall_start, cpu_start = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.phase_seconds.labels(phase=phase).inc(time.monotonic() - wall_start)
            self.phase_cpu_seconds.labels(phase=phase).inc(time.process_time() - cpu_start)
            for gpu, utilisation in self._gpus.utilisation():
                self.phase_gpu_utilisation.labels(phase=phase, gpu=gpu).set(utilisation)

    def add_phase(self, phase: Phase, wall_seconds: float, cpu_seconds: float = 0.0) -> None:
        """Count time measured elsewhere (in a Ray actor) under ``phase``."""
        self.phase_seconds.labels(phase=phase).inc(max(wall_seconds, 0.0))
        self.phase_cpu_seconds.labels(phase=phase).inc(max(cpu_seconds, 0.0))

    def observe_bleed(self, side: BleedSide, waiting_seconds: float, wall_seconds: float) -> None:
        """Set the bleed ratio of a window (a trainer step, a rollout interval)."""
        if wall_seconds > 0:
            ratio = min(max(waiting_seconds / wall_seconds, 0.0), 1.0)
            self.bleed_ratio.labels(side=side).set(ratio)

    def commit_step(self, step: int, policy_version: int, duration_seconds: float) -> None:
        """Record a committed step."""
        self.step.set(step)
        self.policy_version.set(policy_version)
        self.steps_committed.inc()
        self.last_step_timestamp.set(time.time())
        self.step_duration.observe(duration_seconds)

    def set_consumer_info(
        self, stream: str, consumer: str, pending: int, ack_pending: int, redelivered: int
    ) -> None:
        """Set the JetStream consumer gauges from ``ConsumerInfo``: ``num_pending``,
        ``num_ack_pending`` and ``num_redelivered``."""
        self.consumer_pending.labels(stream=stream, consumer=consumer).set(pending)
        self.consumer_ack_pending.labels(stream=stream, consumer=consumer).set(ack_pending)
        self.consumer_redelivered.labels(stream=stream, consumer=consumer).set(redelivered)

    def snapshot(self) -> dict[str, float]:
        """Every sample ``/metrics`` exports now, by ``series_key`` without ``run_id`` and
        ``service``: what a heartbeat carries to Redis for `miles status` and the live view."""
        return snapshot(self.registry)


def snapshot(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):  # the series' start time: no reader needs it
                continue
            labels = {k: v for k, v in sample.labels.items() if k not in BASE_LABELS}
            out[series_key(sample.name, labels)] = float(sample.value)
    return out


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """``name{a="x",b="y"}`` (labels sorted), or ``name``: the exposition's spelling."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


_KEY = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_series_key(key: str) -> tuple[str, dict[str, str]]:
    """The inverse of ``series_key``."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"not a series key: {key!r}")
    return match.group(1), dict(_LABEL.findall(match.group(2) or ""))


class _Labelled(Collector):
    """Another collector's samples with ``run_id`` and ``service`` added, so the process
    metrics (CPU, memory) can be selected per run and service like every other one."""

    def __init__(self, inner: Collector, labels: dict[str, str]) -> None:
        self._inner = inner
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, {**sample.labels, **self._labels}, sample.value)
            yield labelled


def start_metrics_server(
    port: int | None, registry: CollectorRegistry, addr: str = "0.0.0.0"
) -> int:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``port`` 0 or ``None`` binds a free port. Returns the port bound, to log or advertise.
    """
    server, _thread = start_http_server(port or 0, addr=addr, registry=registry)
    return int(server.server_port)


class _Nvml:
    """GPU utilisation through NVML, when nvidia-ml-py is installed and a GPU is present."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def open(cls) -> _Nvml:
        try:
            import pynvml  # nvidia-ml-py: optional, only useful on a GPU host
        except ImportError:
            return cls(None, [])
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            return cls(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)])
        except pynvml.NVMLError:  # no driver or no device: a CPU host
            return cls(None, [])

    def utilisation(self) -> list[tuple[str, float]]:
        """``(gpu index, 0..1)`` per device; NVML averages over its last sample period (<1 s)."""
        return [
            (str(index), self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            for index, handle in enumerate(self._handles)
        ]
