"""What a trained step commits and announces, built from its results alone."""

from __future__ import annotations

import msgspec

from miles import events
from miles.telemetry import record
from miles.trainer import StepMetrics
from services.trainer.outcome import (
    StepResult,
    Weights,
    announcement,
    build_manifest,
    is_own_commit,
)
from services.trainer.position import FullState, ResumeState

BATCH = events.Batch(
    run_id="r",
    policy_version=3,
    batch_id="b7",
    task_ids=["t0", "t1"],
    samples=[
        events.TrainSample(
            sample_id=f"t{i // 2}/{i % 2}",
            prompt_ids=[1, 2],
            response_ids=[3],
            response_logprobs=[-0.5],
            advantage=1.0 if reward else -1.0,
            reward=reward,
            policy_version=version,
        )
        for i, (reward, version) in enumerate([(1.0, 3), (0.0, 3), (1.0, 2), (0.0, 3)])
    ],
)
METRICS = StepMetrics.from_mapping(
    {"loss": 0.5, "kl": 0.01, "grad_norm": 2.0, "tokens": 4.0, "cpu_seconds": 0.3}
)
OLD_STATE = FullState("file:///blobs/state/s3-x", "s" * 64, 3)


def result(position: ResumeState, checkpoint_every: int, metrics: StepMetrics) -> StepResult:
    """What ``train`` gathers: a full state of its own only when one is due."""
    plan = position.plan(checkpoint_every, attempt="a")
    own = FullState(f"file:///blobs/{plan.state_name}", "n" * 64, plan.step)
    return StepResult(
        plan=plan,
        metrics=metrics,
        weights=Weights(f"file:///blobs/{plan.weights_name}", "w" * 64),
        full_state=own if plan.state_due else position.full_state,
        rng_state="rng-after",
        seconds={"train": 1.5, "save_weights": 0.2},
    )


def test_the_manifest_records_the_step_its_files_and_the_batch() -> None:
    manifest = build_manifest(
        result(ResumeState(3, OLD_STATE), 2, METRICS),
        BATCH,
        run_id="r",
        dataset_cursor=12,
        config_hash="cfg",
    )
    assert (manifest.run_id, manifest.step, manifest.policy_version) == ("r", 4, 4)
    assert manifest.weights_uri == "file:///blobs/weights/v4-a"
    assert manifest.weights_sha256 == "w" * 64
    assert (manifest.state_uri, manifest.state_step) == ("file:///blobs/state/s4-a", 4)
    assert manifest.state_sha256 == "n" * 64
    assert (manifest.batch_ids, manifest.task_ids) == (["b7"], ["t0", "t1"])
    assert manifest.sample_ids == ["t0/0", "t0/1", "t1/0", "t1/1"]
    assert (manifest.dataset_cursor, manifest.config_hash) == (12, "cfg")
    assert manifest.rng_state == "rng-after"
    assert (manifest.samples, manifest.min_sample_version, manifest.reward_mean) == (4, 2, 0.5)
    assert manifest.reward_histogram == record.reward_histogram([1.0, 0.0, 1.0, 0.0])
    assert manifest.reward_histogram["0.0"] == manifest.reward_histogram["1.0"] == 2
    assert manifest.turns == {}  # single completions: no turns to count
    assert manifest.seconds == {"train": 1.5, "save_weights": 0.2}
    # The wire keeps the plain mapping, exactly the reported keys.
    assert manifest.metrics == {
        "loss": 0.5,
        "kl": 0.01,
        "grad_norm": 2.0,
        "tokens": 4.0,
        "cpu_seconds": 0.3,
    }
    assert type(msgspec.json.decode(msgspec.json.encode(manifest))["metrics"]) is dict


def test_between_full_states_the_manifest_carries_the_last_one_over() -> None:
    manifest = build_manifest(
        result(ResumeState(4, OLD_STATE), 2, METRICS),
        BATCH,
        run_id="r",
        dataset_cursor=0,
        config_hash="c",
    )
    assert manifest.step == 5
    assert (manifest.state_uri, manifest.state_sha256, manifest.state_step) == (
        OLD_STATE.uri,
        OLD_STATE.sha256,
        3,
    )
    first = build_manifest(
        result(ResumeState(0), 2, METRICS), BATCH, run_id="r", dataset_cursor=0, config_hash="c"
    )
    assert (first.state_uri, first.state_sha256, first.state_step) == (None, None, 0)


def test_a_step_is_announced_from_its_manifest_with_ids_that_dedupe_repeats() -> None:
    manifest = build_manifest(
        result(ResumeState(3, OLD_STATE), 1, METRICS),
        BATCH,
        run_id="r",
        dataset_cursor=0,
        config_hash="c",
    )
    told = announcement(manifest)
    assert told.weights == events.WeightsPublished(
        run_id="r", policy_version=4, uri=manifest.weights_uri, sha256="w" * 64, step=4
    )
    assert told.step == events.StepCommitted(
        run_id="r",
        policy_version=4,
        step=4,
        batch_id="b7",
        task_ids=["t0", "t1"],
        sample_ids=["t0/0", "t0/1", "t1/0", "t1/1"],
        reward_mean=0.5,
        loss=0.5,
        grad_norm=2.0,
        kl=0.01,
        seconds={"train": 1.5, "save_weights": 0.2},
    )
    assert (told.weights_msg_id, told.step_msg_id) == ("weights/v4", "step/4")
    assert announcement(manifest) == told  # a re-announcement is the same events, same ids


def test_a_custom_update_without_grad_norm_or_kl_announces_zeros() -> None:
    custom = StepMetrics.from_mapping({"loss": 0.25})
    manifest = build_manifest(
        result(ResumeState(0), 1, custom), BATCH, run_id="r", dataset_cursor=0, config_hash="c"
    )
    assert manifest.metrics == {"loss": 0.25}
    step = announcement(manifest).step
    assert (step.loss, step.grad_norm, step.kl) == (0.25, 0.0, 0.0)


def test_a_refused_commit_is_ours_only_when_the_stored_step_names_our_weights() -> None:
    ours = build_manifest(
        result(ResumeState(0), 1, METRICS), BATCH, run_id="r", dataset_cursor=0, config_hash="c"
    )
    assert is_own_commit(ours, ours)  # our call landed; its reply was lost
    other = msgspec.structs.replace(ours, weights_uri="file:///blobs/weights/v1-other")
    assert not is_own_commit(ours, other)  # another trainer committed the step
    assert not is_own_commit(ours, None)  # refused, and nothing stored: not ours either


def test_the_manifest_counts_a_multi_turn_batchs_turns_per_role() -> None:
    """What `steps.jsonl` shows of a tool-using policy: its turns per role, step by step."""
    calls = [
        events.Turn(role=r, start=0, end=1, trained=r == "assistant")
        for r in ("assistant", "tool", "assistant")
    ]
    direct = [events.Turn(role="assistant", start=0, end=1, trained=True)]
    samples = [
        msgspec.structs.replace(sample, turns=calls if i == 0 else direct)
        for i, sample in enumerate(BATCH.samples)
    ]
    batch = msgspec.structs.replace(BATCH, samples=samples)
    manifest = build_manifest(
        result(ResumeState(3, OLD_STATE), 2, METRICS),
        batch,
        run_id="r",
        dataset_cursor=12,
        config_hash="cfg",
    )
    assert manifest.turns == {"assistant": 5, "tool": 1}
