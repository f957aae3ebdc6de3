"""The buffer's decisions without a bus or Redis: what it holds, acks, drops, replays and
batches, and in which order the shell is told to do it. Handles are plain strings here."""

from __future__ import annotations

import math

import pytest

from miles.config import BufferConfig
from miles.events import Sample, ScoredGroup
from miles.runtime.store import BatchPlan
from services.buffer.core import Ack, BufferCore, Drop, Held, Hold, Publish

PAIRS = BufferConfig(groups_per_batch=2, max_staleness=0)


def _held(
    task_id: str,
    rewards: tuple[float, ...] = (1.0, 0.0),
    version: int = 0,
    failed: tuple[int, ...] = (),
    handle: str = "",
) -> Held[str]:
    samples = [
        Sample(
            sample_id=f"{task_id}/{i}",
            prompt="1+1=",
            label="2",
            prompt_ids=[1, 2],
            response_ids=[3],
            response_logprobs=[-0.5],
            response_text="2",
            finish_reason="stop",
            policy_version_first=version,
            policy_version_last=version,
            reward=reward,
            failed=i in failed,
        )
        for i, reward in enumerate(rewards)
    ]
    group = ScoredGroup(
        run_id="r",
        policy_version=version,
        task_id=task_id,
        split="train",
        eval_round=-1,
        samples=samples,
    )
    return Held(group, handle or f"msg-{task_id}")


def _core(config: BufferConfig = PAIRS) -> BufferCore[str]:
    return BufferCore(config, renew_every=2.0, now=0.0)


def test_a_trainable_group_is_held_until_its_batch_is_full() -> None:
    core = _core()
    t1, t0 = _held("t1"), _held("t0")

    first = core.step([t1], {}, 0)
    assert first.actions == [Hold(t1)]
    assert first.holding  # half a batch: where the `buffer.holding` crash point fires
    assert core.depth == 1

    second = core.step([t0], {}, 0)
    assert second.actions == [Hold(t0), Publish([t0, t1])]  # dispatch order, not arrival
    assert not second.holding
    assert core.depth == 0


@pytest.mark.parametrize(
    ("held", "reason", "bad_input"),
    [
        (_held("t1", (0.5, 0.5), version=2), "zero_variance", False),
        (_held("t1", (1.0, 0.0, 0.0), failed=(0, 1)), "failed", False),
        (_held("t1", version=1), "stale", False),  # the trainer is at 2, max_staleness 0
        (_held("t1", (1.0, math.nan)), "non_finite_reward", True),
        (_held("t1", (math.inf, 0.0)), "non_finite_reward", True),
        (_held("t1", version=3), "future_version", True),
    ],
)
def test_a_group_that_cannot_be_trained_is_dropped(
    held: Held[str], reason: str, bad_input: bool
) -> None:
    core = _core()
    decided = core.step([held], {}, 2)
    # A broken producer's group is dead-lettered as well as dropped; a useless one only dropped.
    assert decided.actions == [Drop(held, reason, dead_letter=bad_input)]
    assert not decided.holding
    assert core.depth == 0


def test_a_planned_batch_is_published_unchanged_once_all_its_groups_are_back() -> None:
    core = _core()
    plan = BatchPlan("b-planned", ["t1", "t3"], published=False)
    t1, t2, t3 = _held("t1"), _held("t2"), _held("t3")

    first = core.step([t1, t2], {"t1": plan}, 0)
    # Dispatch order alone would batch t1 with t2; t1 waits for the partner it was planned with.
    assert first.actions == [Hold(t1, replay="b-planned"), Hold(t2)]
    assert first.holding
    assert core.depth == 2

    # t3 comes back after the policy moved on: stale now, but a planned batch is published as
    # planned (the stream drops the duplicate if it got there before the crash). The held t2
    # is checked against the new version after the replay, and dropped.
    second = core.step([t3], {"t3": plan}, 1)
    assert second.actions == [
        Hold(t3, replay="b-planned"),
        Publish([t1, t3], replay="b-planned"),
        Drop(t2, "stale", dead_letter=False),
    ]
    assert core.depth == 0


def test_a_group_whose_batch_was_published_is_only_acked() -> None:
    core = _core()
    plan = BatchPlan("b-done", ["t4", "t5"], published=True)
    t4 = _held("t4", (0.5, 0.5))  # would be dropped if admitted: it is not
    core.step([_held("t4", handle="old")], {}, 0)  # held under a handle that went stale

    decided = core.step([t4], {"t4": plan}, 0)
    assert decided.actions == [Ack(t4)]
    assert core.depth == 0  # never batched again
    assert core.step([_held("t6")], {}, 0).actions == [Hold(_held("t6"))]


def test_a_redelivered_group_replaces_its_stale_handle() -> None:
    core = _core()
    core.step([_held("t1", handle="first")], {}, 0)
    core.step([_held("t1", handle="again")], {}, 0)
    assert core.depth == 1

    decided = core.step([_held("t2")], {}, 0)
    [publish] = [action for action in decided.actions if isinstance(action, Publish)]
    assert [held.handle for held in publish.groups] == ["again", "msg-t2"]


def test_held_groups_are_checked_again_when_the_policy_version_moves() -> None:
    core = _core(BufferConfig(groups_per_batch=4, max_staleness=1))
    t1, t2 = _held("t1", version=0), _held("t2", version=1)
    assert core.step([t1, t2], {}, 1).actions == [Hold(t1), Hold(t2)]
    assert core.step([], {}, 1).actions == []  # same version: nothing to check

    t3 = _held("t3", version=2)
    decided = core.step([t3], {}, 2)
    # t3 was just checked on arrival; the held ones are checked again, in the order they came.
    assert decided.actions == [Hold(t3), Drop(t1, "stale", dead_letter=False), Hold(t2)]
    assert decided.holding
    assert core.depth == 2


def test_batches_are_full_and_oldest_dispatched_first() -> None:
    core = _core()
    arrived = [_held(task_id) for task_id in ("t10", "t9", "t2", "t1", "t3")]
    _, t9, t2, t1, t3 = arrived

    decided = core.step(arrived, {}, 0)
    assert decided.actions == [
        *(Hold(held) for held in arrived),
        Publish([t1, t2]),
        Publish([t3, t9]),
    ]
    assert not decided.holding  # it had a full batch to publish
    assert core.depth == 1  # t10, the newest, waits for a partner

    waiting = core.step([], {}, 0)
    assert waiting.actions == []
    assert waiting.holding


def test_an_oversized_batch_drops_its_groups_without_a_second_dead_letter() -> None:
    t1, t2 = _held("t1"), _held("t2")
    # the bus dead-letters the batch itself; each group is then recorded and acked
    assert Publish([t1, t2]).oversized() == [
        Drop(t1, "oversized", dead_letter=False),
        Drop(t2, "oversized", dead_letter=False),
    ]


def test_held_groups_are_renewed_every_third_of_ack_wait() -> None:
    core = BufferCore[str](PAIRS, renew_every=2.0, now=100.0)
    assert core.renewals(101.0) == []  # nothing due, and nothing held
    core.step([_held("t1")], {}, 0)
    assert core.renewals(101.5) == []
    assert core.renewals(102.5) == ["msg-t1"]
    assert core.renewals(104.0) == []  # counted from the last renewal
    assert core.renewals(104.6) == ["msg-t1"]


def test_zero_variance_groups_are_kept_once_max_filter_rounds_are_spent() -> None:
    """DAPO's max_num_gen_batches: after 1 round (2 groups, a batch's worth) dropped for zero
    variance, the next such group is held so the step can go on; a published batch starts the
    count again."""
    core = _core(BufferConfig(groups_per_batch=2, max_staleness=0, max_filter_rounds=1))
    flat = [_held(f"t{i}", rewards=(1.0, 1.0)) for i in range(5)]
    first = core.step(flat[:2], {}, 0).actions
    assert first == [Drop(h, "zero_variance", dead_letter=False) for h in flat[:2]]
    assert core.step([flat[2]], {}, 0).actions == [Hold(flat[2])]
    published = core.step([flat[3]], {}, 0).actions
    assert published == [Hold(flat[3]), Publish([flat[2], flat[3]])]
    assert core.step([flat[4]], {}, 0).actions == [Drop(flat[4], "zero_variance", False)]


def test_without_max_filter_rounds_zero_variance_groups_are_always_dropped() -> None:
    core = _core()
    flat = [_held(f"t{i}", rewards=(0.0, 0.0)) for i in range(6)]
    actions = core.step(flat, {}, 0).actions
    assert actions == [Drop(h, "zero_variance", dead_letter=False) for h in flat]
