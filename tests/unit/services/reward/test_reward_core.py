"""The reward service's decisions without a bus: the scored group and where it goes."""

from __future__ import annotations

from miles.events import GeneratedGroup, Sample, Split
from miles.runtime.subjects import Subjects
from services.reward.core import delivery, scored_group

SUBJECTS = Subjects("run-1")


def _generated(task_id: str, split: Split = "train") -> GeneratedGroup:
    sample = Sample(
        sample_id=f"{task_id}/0",
        prompt="1+2=",
        label="3",
        prompt_ids=[1, 2],
        response_ids=[3],
        response_logprobs=[-0.5],
        response_text="3",
        finish_reason="stop",
        policy_version_first=4,
        policy_version_last=5,
        reward=1.0,
    )
    return GeneratedGroup(
        run_id="run-1",
        policy_version=4,
        task_id=task_id,
        split=split,
        eval_round=2 if split == "eval" else -1,
        samples=[sample],
        engine="e0",
        generate_seconds=3.0,
    )


def test_the_scored_group_keeps_the_generated_groups_identity_and_samples() -> None:
    generated = _generated("t7")
    scored = scored_group("run-1", generated, 0.25)
    assert (scored.run_id, scored.policy_version, scored.task_id) == ("run-1", 4, "t7")
    assert (scored.split, scored.eval_round) == ("train", -1)
    assert scored.samples == generated.samples  # rewards were set on them in place
    assert scored.score_seconds == 0.25


def test_a_training_group_goes_to_the_buffer_and_is_replaced_if_oversized() -> None:
    out = delivery(SUBJECTS, scored_group("run-1", _generated("t7"), 0.0))
    assert out.subject == SUBJECTS.scored == "miles.run-1.samples.scored"
    assert out.msg_id == "scored/t7"
    assert out.replace_if_oversized


def test_an_evaluation_group_goes_to_the_coordinator_and_is_never_replaced() -> None:
    scored = scored_group("run-1", _generated("eval2-0", "eval"), 0.0)
    out = delivery(SUBJECTS, scored)
    assert (scored.split, scored.eval_round) == ("eval", 2)
    assert out.subject == SUBJECTS.eval_scored
    assert out.msg_id == "scored/eval2-0"
    assert not out.replace_if_oversized
