"""Where the trainer stands after a manifest, and what its next step writes."""

from __future__ import annotations

from miles.runtime.checkpoint import Manifest
from services.trainer.position import FullState, ResumeState, StepPlan


def manifest(step: int, state_step: int | None) -> Manifest:
    """Step ``step``'s manifest; its latest full state is ``state_step``'s (None: none yet)."""
    return Manifest(
        run_id="r",
        step=step,
        policy_version=step,
        weights_uri=f"file:///blobs/weights/v{step}-a",
        weights_sha256="w" * 64,
        state_uri=None if state_step is None else f"file:///blobs/state/s{state_step}-a",
        state_sha256=None if state_step is None else "s" * 64,
        state_step=state_step or 0,
        batch_ids=[f"b{step}"],
        task_ids=[],
        sample_ids=[],
        dataset_cursor=0,
        rng_state="rng",
        config_hash="c",
        samples=0,
        min_sample_version=0,
        reward_mean=0.0,
        metrics={"loss": 0.0},
        seconds={},
    )


def test_a_new_run_stands_at_step_zero_with_no_full_state() -> None:
    assert ResumeState.of(None) == ResumeState(step=0, full_state=None)


def test_a_manifest_gives_its_step_and_its_latest_full_state() -> None:
    assert ResumeState.of(manifest(5, state_step=4)) == ResumeState(
        5, FullState("file:///blobs/state/s4-a", "s" * 64, 4)
    )
    assert ResumeState.of(manifest(3, state_step=None)) == ResumeState(3, None)


def test_moments_behind_counts_the_steps_a_resume_loses_from_the_optimizer() -> None:
    assert ResumeState.of(manifest(4, state_step=4)).moments_behind == 0
    assert ResumeState.of(manifest(5, state_step=4)).moments_behind == 1
    assert ResumeState.of(manifest(3, state_step=None)).moments_behind == 3
    assert ResumeState.of(None).moments_behind == 0


def test_a_full_state_is_due_every_checkpoint_every_steps() -> None:
    due = [ResumeState(step).plan(3, "a").state_due for step in range(7)]
    assert due == [False, False, True, False, False, True, False]  # steps 3 and 6
    assert all(ResumeState(step).plan(1, "a").state_due for step in range(4))


def test_the_next_step_writes_under_names_unique_to_its_attempt() -> None:
    plan = ResumeState(6).plan(1, attempt="1a2b3c4d")
    assert plan == StepPlan(step=7, attempt="1a2b3c4d", state_due=True)
    assert (plan.weights_staging, plan.weights_name) == ("v7-1a2b3c4d", "weights/v7-1a2b3c4d")
    assert (plan.state_staging, plan.state_name) == ("state7-1a2b3c4d", "state/s7-1a2b3c4d")
    retry = ResumeState(6).plan(1, attempt="99999999")  # the same step after a crash
    assert retry.weights_name != plan.weights_name and retry.state_name != plan.state_name
