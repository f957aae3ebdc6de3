"""The coordinator's pacing: how many training tasks go out at the staleness gate and the
in-flight bound, filtered groups replaced, a restarted coordinator resuming at its cursor."""

from __future__ import annotations

import dataclasses

from miles.config import load_config
from miles.data import Prompt
from services.coordinator.pacing import Pacing, Progress
from services.coordinator.sources import training_task


def pacing(
    steps: int = 10, groups_per_batch: int = 2, max_staleness: int = 0, in_flight: int = 64
) -> Pacing:
    return Pacing(
        steps=steps,
        groups_per_batch=groups_per_batch,
        max_staleness=max_staleness,
        max_groups_in_flight=in_flight,
    )


def test_strict_on_policy_dispatches_one_batch_per_committed_step() -> None:
    strict = pacing(max_staleness=0)
    assert strict.due(Progress(), cursor=0) == range(0, 2)
    assert strict.due(Progress(), cursor=2) == range(2, 2)  # the gate: nothing more at v0
    after_step_1 = Progress(step=1, trained_groups=2)
    assert strict.due(after_step_1, cursor=2) == range(2, 4)


def test_bounded_staleness_runs_k_versions_ahead() -> None:
    assert pacing(max_staleness=2).allowed(Progress()) == 3 * 2
    assert pacing(max_staleness=2).allowed(Progress(step=4, trained_groups=8)) == 7 * 2


def test_the_gate_stops_at_the_last_step() -> None:
    assert pacing(steps=3, max_staleness=5).allowed(Progress()) == 3 * 2
    assert pacing(steps=3, max_staleness=5).allowed(Progress(step=3, trained_groups=6)) == 6


def test_the_in_flight_bound_caps_dispatch_under_a_loose_gate() -> None:
    bounded = pacing(groups_per_batch=8, max_staleness=1, in_flight=3)
    assert bounded.due(Progress(), cursor=0) == range(0, 3)
    assert bounded.due(Progress(step=0, trained_groups=0), cursor=3) == range(3, 3)
    # Two groups trained (or dropped) free two places, whatever the gate allows.
    assert bounded.due(Progress(step=0, trained_groups=2), cursor=3) == range(3, 5)
    assert bounded.due(Progress(filtered_groups=2), cursor=3) == range(3, 5)


def test_each_filtered_group_is_replaced_by_one_more_task() -> None:
    # Step 1 trained t0, t1; t2, t3 out; the buffer dropped t2: exactly one replacement, t4.
    strict = pacing(max_staleness=0)
    assert strict.due(Progress(step=1, trained_groups=2), cursor=4) == range(4, 4)
    assert strict.due(Progress(step=1, trained_groups=2, filtered_groups=1), 4) == range(4, 5)


def test_a_restarted_coordinator_resumes_at_its_cursor() -> None:
    strict = pacing(max_staleness=0)
    progress = Progress(step=1, trained_groups=2)
    assert strict.due(progress, cursor=3) == range(3, 4)  # t2 went out before the crash
    assert strict.due(progress, cursor=6) == range(6, 6)  # past the bounds: nothing, no rewind


def test_training_task_cycles_the_dataset_with_a_seed_per_cursor() -> None:
    prompts = [Prompt("0+1=", "1"), Prompt("1+1=", "2")]
    task = training_task("run", prompts, cursor=3, policy_version=1, group_size=4, seed=7)
    assert (task.task_id, task.prompt, task.label, task.split) == ("t3", "1+1=", "2", "train")
    assert (task.policy_version, task.group_size, task.seed) == (1, 4, 7 * 1_000_003 + 3)
    assert not task.greedy
    again = training_task("run", prompts, cursor=3, policy_version=2, group_size=4, seed=7)
    assert again.seed == task.seed  # a task re-sent after a crash samples the same group


def test_pacing_reads_its_bounds_from_the_config() -> None:
    config = load_config(
        overrides=[
            "run.steps=5",
            "buffer.groups_per_batch=3",
            "buffer.max_staleness=1",
            "coordinator.max_groups_in_flight=4",
        ]
    )
    assert Pacing.from_config(config) == pacing(5, 3, 1, 4)


def test_the_evaluation_barrier_holds_the_next_step_until_the_round_is_in() -> None:
    barrier = Pacing(steps=10, groups_per_batch=2, max_staleness=0, max_groups_in_flight=64)
    barrier = dataclasses.replace(barrier, eval_barrier=True)
    assert barrier.allowed(Progress(), evaluating=0) == 0  # the initial policy is measured first
    assert barrier.allowed(Progress(), evaluating=None) == 2
    after_5 = Progress(step=5, trained_groups=10)
    assert barrier.allowed(after_5, evaluating=5) == 10  # step 6's groups wait for round 5
    assert barrier.allowed(after_5, evaluating=None) == 12
    # without the barrier (RL: eval tasks queue ahead of train tasks) the round does not gate
    assert pacing().allowed(after_5, evaluating=5) == 12


def test_the_barrier_is_on_for_offline_dpo_only() -> None:
    assert Pacing.from_config(load_config(overrides=["algorithm.name=dpo"])).eval_barrier
    assert not Pacing.from_config(load_config()).eval_barrier


def test_a_drain_ends_at_the_step_that_trains_everything_dispatched() -> None:
    ahead = pacing(steps=10, groups_per_batch=2, max_staleness=2)
    assert ahead.drain_step(Progress(step=1, trained_groups=2), cursor=8) == 4
    assert ahead.drain_step(Progress(step=1, trained_groups=2), cursor=7) == 4  # half a batch
    # filtered groups are replaced, not trained: they count toward no step
    assert ahead.drain_step(Progress(step=1, trained_groups=2, filtered_groups=3), cursor=8) == 3
    assert ahead.drain_step(Progress(step=3, trained_groups=6), cursor=6) == 3  # nothing out
    assert pacing(steps=3).drain_step(Progress(step=2, trained_groups=4), cursor=12) == 3
