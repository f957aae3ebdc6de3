"""The coordinator's evaluation rounds: when one is due, counting results, writing a round
once (complete, or partial after the timeout), late and foreign results ignored."""

from __future__ import annotations

from miles import events
from miles.data import Prompt
from miles.runtime.run_record import EvalResult
from services.coordinator.evaluation import EvalRounds, eval_tasks, summarize


def rounds(recorded: tuple[int, ...] = ()) -> EvalRounds:
    return EvalRounds(
        eval_every=2, last_step=5, timeout_seconds=10.0, correct_reward=1.0, recorded=recorded
    )


def result(task_id: str, reward: float, round_: int = 2, version: int = 2) -> events.ScoredGroup:
    sample = events.Sample(
        sample_id=f"{task_id}/0",
        prompt="2+2=",
        label="4",
        prompt_ids=[1],
        response_ids=[2],
        response_logprobs=[-0.1],
        response_text="4",
        finish_reason="stop",
        policy_version_first=version,
        policy_version_last=version,
        reward=reward,
    )
    return events.ScoredGroup(
        run_id="run",
        policy_version=version,
        task_id=task_id,
        split="eval",
        eval_round=round_,
        samples=[sample],
    )


def test_rounds_are_due_every_k_steps_and_after_the_last() -> None:
    book = rounds()
    assert [step for step in range(8) if book.due(step)] == [0, 2, 4, 5]
    book.start(2, ["a"], now=0.0)
    assert not book.due(2)  # a redelivered StepCommitted starts no second round


def test_a_round_recorded_before_a_restart_is_not_run_again() -> None:
    book = rounds(recorded=(0, 2))
    assert not book.missing(0) and not book.due(2)
    assert book.missing(3) and book.due(4)
    assert book.record(result("eval2-0-old", 1.0)) is None  # its predecessor's task
    assert book.complete


def test_the_last_result_completes_the_round_once() -> None:
    book = rounds()
    book.start(2, ["a", "b", "c"], now=0.0)
    assert book.record(result("a", 1.0)) is None
    assert book.record(result("b", 0.0, version=3)) is None
    assert not book.complete
    done = book.record(result("c", 1.0))
    assert done is not None and done.recorded and book.complete
    assert book.record(result("c", 1.0)) is None  # redelivered: not written twice
    summary = summarize(done, time=123.0)
    assert summary == EvalResult(
        round=2,
        after_step=2,
        policy_versions=[2, 3],
        accuracy=2 / 3,
        reward_mean=2 / 3,
        n=3,
        expected=3,
        time=123.0,
    )


def test_a_failed_sample_or_a_reward_under_the_threshold_is_not_correct() -> None:
    book = rounds()
    book.start(2, ["a", "b"], now=0.0)
    failed = result("a", 1.0)
    failed.samples[0].failed = True
    book.record(failed)
    done = book.record(result("b", 0.99))
    assert done is not None
    assert (summarize(done, 0.0).accuracy, done.correct) == (0.0, {"a": False, "b": False})


def test_a_result_of_another_task_or_round_is_ignored() -> None:
    book = rounds()
    book.start(2, ["a"], now=0.0)
    assert book.record(result("x", 1.0)) is None
    assert book.record(result("a", 1.0, round_=4)) is None
    assert not book.complete


def test_a_round_missing_results_is_written_partial_after_the_timeout() -> None:
    book = rounds()
    book.start(2, ["a", "b"], now=100.0)
    book.record(result("a", 1.0))
    assert book.overdue(now=110.0) == []  # exactly the timeout: still waiting
    [late] = book.overdue(now=110.5)
    assert late.recorded and book.complete
    assert book.overdue(now=200.0) == []  # written once
    summary = summarize(late, 0.0)
    assert (summary.n, summary.expected, summary.accuracy) == (1, 2, 1.0)


def test_a_late_result_for_a_written_round_changes_nothing() -> None:
    book = rounds()
    book.start(2, ["a", "b"], now=0.0)
    book.record(result("a", 1.0))
    [late] = book.overdue(now=11.0)
    assert book.record(result("b", 0.0)) is None
    assert summarize(late, 0.0).n == 1 and book.complete


def test_the_run_waits_for_every_open_round() -> None:
    book = rounds(recorded=(0,))
    book.start(2, ["a"], now=0.0)
    book.start(4, ["b"], now=0.0)
    book.record(result("a", 1.0))
    assert not book.complete
    book.record(result("b", 1.0, round_=4))
    assert book.complete


def test_eval_tasks_are_greedy_single_samples_named_by_round_and_instance() -> None:
    prompts = [Prompt("2+2=", "4"), Prompt("3+3=", "6")]
    tasks = eval_tasks("run", 4, prompts, "host-1")
    assert [(t.task_id, t.prompt, t.label) for t in tasks] == [
        ("eval4-0-host-1", "2+2=", "4"),
        ("eval4-1-host-1", "3+3=", "6"),
    ]
    assert {(t.split, t.greedy, t.group_size, t.eval_round, t.policy_version) for t in tasks} == {
        ("eval", True, 1, 4, 4)
    }


def test_pending_names_the_oldest_round_to_measure_started_or_not() -> None:
    r = rounds()
    assert r.pending(1) is None  # nothing due after step 1, nothing open
    assert r.pending(2) == 2  # due, not started yet: the step's notice is still on its way
    r.start(2, ["a"], now=0.0)
    assert r.pending(2) == 2 and r.pending(3) == 2  # open until its result is in
    assert r.record(result("a", 1.0)) is not None
    assert r.pending(3) is None
    r.start(4, ["b"], now=0.0)
    assert r.overdue(now=100.0)  # written partial: no longer pending
    assert r.pending(4) is None


def test_a_round_keeps_its_first_prompts_completions_for_the_trackers() -> None:
    rounds = EvalRounds(eval_every=2, last_step=4, timeout_seconds=60, correct_reward=1.0)
    ids = [f"eval2-{i}-coord" for i in range(10)]
    rounds.start(2, ids, now=0.0)
    done = None
    for task_id in reversed(ids):
        done = rounds.record(result(task_id, reward=1.0)) or done
    assert done is not None
    examples = summarize(done, time=0.0).examples
    assert len(examples) == 8 and all(e.reward == 1.0 for e in examples)
