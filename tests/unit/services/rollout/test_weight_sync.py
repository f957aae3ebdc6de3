"""Weight sync, pure: which engines need which version, and when to ask before loading."""

from __future__ import annotations

from miles import events
from services.rollout.weight_sync import engines_behind, plan_sync, version_needed


def published(version: int) -> events.WeightsPublished:
    return events.WeightsPublished(
        run_id="run",
        policy_version=version,
        uri=f"blob://w/{version}",
        sha256="ab" * 32,
        step=version,
    )


def test_nothing_to_do_before_any_weights_or_when_every_engine_holds_the_latest() -> None:
    assert plan_sync(None, [0, 0], pushes_weights=False) is None
    assert plan_sync(published(3), [3, 3], pushes_weights=False) is None
    assert plan_sync(published(3), [4, 3], pushes_weights=True) is None  # a push ran ahead


def test_engines_behind_the_latest_load_its_blob() -> None:
    sync = plan_sync(published(3), [3, 1, 2], pushes_weights=False)
    assert sync is not None
    assert (sync.version, sync.ask_engines) == (3, False)
    assert (sync.published.uri, sync.published.sha256) == ("blob://w/3", "ab" * 32)
    assert sync.behind([3, 1, 2]) == [1, 2]


def test_pushed_weights_are_asked_for_first_and_only_missed_pushes_load_the_blob() -> None:
    sync = plan_sync(published(5), [4, 4], pushes_weights=True)
    assert sync is not None and sync.ask_engines
    # Asked: engine 0 got the push, engine 1 missed it (it was restarting).
    assert sync.behind([5, 4]) == [1]
    assert sync.behind([5, 5]) == []  # every push landed: no blob


def test_engines_behind() -> None:
    assert engines_behind(2, [0, 2, 1, 3]) == [0, 2]
    assert engines_behind(0, []) == []


def test_a_batch_waits_for_the_newest_version_its_tasks_ask_for() -> None:
    tasks = [
        events.Task(run_id="run", policy_version=v, task_id=f"t{v}", prompt="1+1=")
        for v in (2, 5, 3)
    ]
    assert version_needed(tasks) == 5
    assert version_needed([]) == 0  # no task: nothing to wait for
