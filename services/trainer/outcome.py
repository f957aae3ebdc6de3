"""What a trained step commits and announces: pure builders over its results.

The manifest is the step's durable record (``miles.runtime.checkpoint``); the two events are
derived from a manifest alone, so a redelivered batch the ledger says was trained re-announces
its step with the same events and ids (JetStream drops the repeats).
"""

from __future__ import annotations

from dataclasses import dataclass

from miles import events
from miles.runtime.checkpoint import Manifest
from miles.telemetry import record
from miles.trainer import StepMetrics
from services.trainer.position import FullState, StepPlan


@dataclass(frozen=True)
class Weights:
    """The step's HF weights directory in the blob store; ``sha256`` its digest
    (``miles.shards.weights_digest``: of the one file, or of the index naming every shard's)."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class StepResult:
    """Everything one attempt produced before its commit."""

    plan: StepPlan
    metrics: StepMetrics
    weights: Weights
    full_state: FullState | None
    """The latest full state after the step: its own when one was due, else the one before."""
    rng_state: str
    seconds: dict[str, float]
    """Wall seconds per part of the step (wait_for_batch, train, save_weights, save_state)."""


def build_manifest(
    result: StepResult,
    batch: events.Batch,
    *,
    run_id: str,
    dataset_cursor: int,
    config_hash: str,
) -> Manifest:
    step, state = result.plan.step, result.full_state
    rewards = [sample.reward for sample in batch.samples]
    return Manifest(
        run_id=run_id,
        step=step,
        policy_version=step,
        weights_uri=result.weights.uri,
        weights_sha256=result.weights.sha256,
        state_uri=state.uri if state else None,
        state_sha256=state.sha256 if state else None,
        state_step=state.step if state else 0,
        batch_ids=[batch.batch_id],
        task_ids=batch.task_ids,
        sample_ids=[sample.sample_id for sample in batch.samples],
        dataset_cursor=dataset_cursor,
        rng_state=result.rng_state,
        config_hash=config_hash,
        samples=len(batch.samples),
        min_sample_version=min(sample.policy_version for sample in batch.samples),
        reward_mean=sum(rewards) / len(rewards),
        reward_histogram=record.reward_histogram(rewards),
        turns=record.turn_counts(batch.samples),
        metrics=result.metrics.to_dict(),  # the wire keeps the plain mapping
        seconds=result.seconds,
    )


@dataclass(frozen=True)
class Announcement:
    """A committed step's two events, each with the message id that dedupes its repeats."""

    weights: events.WeightsPublished
    step: events.StepCommitted

    @property
    def weights_msg_id(self) -> str:
        return f"weights/v{self.weights.policy_version}"

    @property
    def step_msg_id(self) -> str:
        return f"step/{self.step.step}"


def announcement(manifest: Manifest) -> Announcement:
    step, metrics = manifest.step, manifest.metrics
    return Announcement(
        weights=events.WeightsPublished(
            run_id=manifest.run_id,
            policy_version=step,
            uri=manifest.weights_uri,
            sha256=manifest.weights_sha256,
            step=step,
        ),
        step=events.StepCommitted(
            run_id=manifest.run_id,
            policy_version=step,
            step=step,
            batch_id=manifest.batch_ids[0],
            task_ids=manifest.task_ids,
            sample_ids=manifest.sample_ids,
            reward_mean=manifest.reward_mean,
            loss=metrics["loss"],
            # a custom @miles.update may report neither
            grad_norm=metrics.get("grad_norm", 0.0),
            kl=metrics.get("kl", 0.0),
            seconds=manifest.seconds,
        ),
    )


def is_own_commit(ours: Manifest, stored: Manifest | None) -> bool:
    """A refused commit whose stored manifest names our weights was ours: its reply was lost
    (a Redis restart) and the retried call found it done. Anything else is another trainer."""
    return stored is not None and stored.weights_uri == ours.weights_uri
