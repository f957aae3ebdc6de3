"""What the services record, one function per event of the loop, so a service's main says
``record.generated(...)`` instead of a dozen metric and span calls inline.

Each function updates the process's ``Metrics`` and, where the event is part of a sample's
journey, opens or records its span under the current one (a ``process <subject>`` span).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from opentelemetry import trace

from miles import events
from miles.telemetry import tracing
from miles.telemetry.metrics import REWARD_BUCKETS, BleedSide, Family, Metrics, Phase

TRAIN_PHASES: tuple[tuple[str, Phase], ...] = (
    ("seconds_forward_backward", "train_forward_backward"),
    ("seconds_optimizer", "optimizer"),
)
"""The trainer backend's own timing of one step, per ``Phase``."""


@dataclass
class BleedWindow:
    """Waiting over wall time, one window at a time: a trainer step, or a rollout's time
    between two policy versions. ``close`` sets ``miles_bleed_ratio{side}`` for the window
    and opens the next, so the gauge follows the run instead of averaging its whole life."""

    metrics: Metrics
    side: BleedSide
    opened: float = field(default_factory=time.monotonic)
    waited: float = 0.0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.waited += time.monotonic() - start

    def close(self) -> None:
        now = time.monotonic()
        self.metrics.observe_bleed(self.side, self.waited, now - self.opened)
        self.opened, self.waited = now, 0.0


def expect(family: Family[Any], label: str, values: Iterable[str]) -> None:
    """Export these series at 0 from the start, so ``increase()`` counts their first event
    (a series that appears at 1 has no earlier sample to count from)."""
    for value in values:
        family.labels(**{label: value})


def generated(
    metrics: Metrics, group: events.GeneratedGroup, start_time: int, end_time: int
) -> None:
    """One group generated: the ``generate`` span (times in ns since the epoch, as the engine
    call that served it ran) and the samples and tokens counted under its engine. The tokens
    are the policy's own: a multi-turn sample's tool output was not generated. A multi-turn
    group's span carries each sample's turns, roles in order (``miles.turns``)."""
    completion = sum(events.trained_tokens(sample) for sample in group.samples)
    attributes: dict[str, Any] = {
        "miles.task_id": group.task_id,
        "miles.engine": group.engine,
        "miles.samples": len(group.samples),
        "miles.policy_version": group.policy_version,
        "gen_ai.usage.input_tokens": sum(len(s.prompt_ids) for s in group.samples),
        "gen_ai.usage.output_tokens": completion,
        "miles.generate_seconds": group.generate_seconds,
    }
    if any(sample.turns for sample in group.samples):
        attributes["miles.turns"] = [
            " ".join(turn.role for turn in sample.turns) for sample in group.samples
        ]
    tracing.record_span("generate", start_time, end_time, attributes)
    metrics.samples_generated.labels(engine=group.engine).inc(len(group.samples))
    metrics.tokens_generated.labels(engine=group.engine).inc(completion)


def scored(
    metrics: Metrics, group: events.ScoredGroup, rewards: Sequence[dict[str, float]]
) -> None:
    """One group scored: ``rewards`` holds each sample's value per reward function; a
    failed sample has none. Evaluation groups are counted but kept out of the histogram:
    held-out greedy answers would blur the training reward distribution."""
    if group.split == "train":
        for values in rewards:
            for reward_fn, value in values.items():
                metrics.reward.labels(reward_fn=reward_fn).observe(value)
                metrics.reward_running_sum.labels(reward_fn=reward_fn).inc(value)
    metrics.samples_scored.inc(len(group.samples))
    trace.get_current_span().set_attributes(
        {
            "miles.task_id": group.task_id,
            "miles.samples": len(group.samples),
            "miles.failed": sum(sample.failed for sample in group.samples),
            "miles.reward_mean": sum(s.reward for s in group.samples) / max(len(group.samples), 1),
        }
    )


def trained(
    metrics: Metrics, samples: Sequence[events.TrainSample], result: dict[str, float], version: int
) -> None:
    """One optimizer step done on policy ``version``: its learning signals and time.

    The backend times forward/backward and the optimizer itself (it runs in a Ray actor);
    the actor's CPU seconds for the whole call are split between the two in proportion to
    their wall time. A custom ``@miles.update`` reports no split: all of it counts as
    forward/backward.
    """
    metrics.train_loss.set(result["loss"])
    for name, gauge in (("kl", metrics.train_kl), ("grad_norm", metrics.train_grad_norm)):
        if name in result:
            gauge.set(result[name])
    metrics.train_entropy.set(result.get("entropy") or entropy_estimate(samples))
    for key, gauge in metrics.train_signals.items():
        if key in result:
            gauge.set(result[key])
    for sample in samples:
        metrics.sample_staleness.observe(version - sample.policy_version)
    walls: dict[Phase, float] = {phase: result.get(key, 0.0) for key, phase in TRAIN_PHASES}
    if not any(walls.values()):
        walls["train_forward_backward"] = result.get("seconds", 0.0)
    total = sum(walls.values())
    cpu = result.get("cpu_seconds", 0.0)
    for phase, wall in walls.items():
        metrics.add_phase(phase, wall, cpu * wall / total if total > 0 else 0.0)


def entropy_estimate(samples: Sequence[events.TrainSample]) -> float:
    """Mean negative log-probability of the sampled tokens: a Monte Carlo estimate of the
    sampling policy's per-token entropy, H(π) = E_{y~π}[-log π(y)], from what the engines
    already returned (the trainer computes no full-vocabulary entropy)."""
    logprobs = [
        logprob
        for sample in samples
        for logprob, trained in zip(
            sample.response_logprobs, sample.loss_mask or repeat(1), strict=False
        )
        if trained  # a tool's tokens carry logprob 0: no sampling happened there
    ]
    return -sum(logprobs) / len(logprobs) if logprobs else 0.0


def turn_counts(samples: Iterable[events.TrainSample]) -> dict[str, int]:
    """Turns per role over ``samples`` (``{"assistant": 80, "tool": 17}``), for the manifest."""
    return dict(Counter(turn.role for sample in samples for turn in sample.turns))


def reward_histogram(rewards: Sequence[float]) -> dict[str, int]:
    """Counts per bucket of ``REWARD_BUCKETS`` (upper bound, inclusive; ``+Inf`` last), not
    cumulative: one step's reward distribution, as the run report plots it."""
    bounds = [*REWARD_BUCKETS, math.inf]
    counts = dict.fromkeys((_bound_label(b) for b in bounds), 0)
    for reward in rewards:
        bound = next((b for b in bounds if reward <= b), math.inf)  # NaN: past every bound
        counts[_bound_label(bound)] += 1
    return counts


def _bound_label(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def engines(metrics: Metrics, health: list[tuple[str, float | None, bool]]) -> None:
    """Per engine: its recent tokens/s and whether it is drained as a straggler."""
    for name, rate, drained in health:
        if rate is not None:
            metrics.engine_tokens_per_second.labels(engine=name).set(rate)
        metrics.engine_straggler.labels(engine=name).set(1.0 if drained else 0.0)
