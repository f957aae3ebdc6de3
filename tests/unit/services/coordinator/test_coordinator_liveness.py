"""The coordinator's liveness: an instance silent for ``missed`` heartbeat periods is presumed
dead once, and alive again when it beats; restart counts exported as increments only."""

from __future__ import annotations

from services.coordinator.liveness import Liveness, Restarts, Silence


def test_a_silent_instance_is_reported_once_and_its_return_is_noticed() -> None:
    liveness = Liveness.for_period(heartbeat_seconds=2.0)  # presumed dead after 6 s
    assert liveness.beat("rollout/a", now=0.0)  # new
    assert liveness.beat("reward/b", now=0.0)
    assert not liveness.beat("rollout/a", now=2.0)  # nothing new
    assert liveness.check(now=6.0) == []  # reward/b: 6 s, not more
    assert liveness.check(now=7.0) == [Silence("reward/b", 7.0)]
    assert liveness.alive == ["rollout/a"]
    assert liveness.check(now=7.5) == []  # said once
    assert liveness.beat("reward/b", now=8.0)  # back
    assert liveness.alive == ["reward/b", "rollout/a"]
    assert liveness.check(now=9.0) == [Silence("rollout/a", 7.0)]


def test_restart_counts_are_read_once_a_period_and_exported_as_increments() -> None:
    restarts = Restarts(period=2.0)
    assert restarts.due(now=5.0)
    assert not restarts.due(now=6.0)
    assert restarts.due(now=7.5)
    assert restarts.new({"rollout": 2, "reward": 0}) == {"rollout": 2}
    assert restarts.new({"rollout": 2}) == {}
    assert restarts.new({"rollout": 3, "buffer": 1}) == {"rollout": 1, "buffer": 1}
