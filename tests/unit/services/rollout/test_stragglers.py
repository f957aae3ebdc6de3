"""Straggler tracking, pure: rates from running totals, the median, patience, restarts."""

from __future__ import annotations

from miles.engine.generation import EngineHandle
from services.rollout.stragglers import StragglerTracker, Throughput, engine_flagged


class Totals:
    """Running totals per engine, advanced one round at a time at given tokens/s."""

    def __init__(self, engines: int) -> None:
        self.totals = [Throughput() for _ in range(engines)]

    def round(self, *rates: float, seconds: float = 1.0) -> list[Throughput]:
        self.totals = [
            Throughput(t.tokens + int(rate * seconds), t.seconds + seconds) if rate else t
            for t, rate in zip(self.totals, rates, strict=True)
        ]
        return self.totals


def tracker(engines: int = 3, patience: int = 2, max_restarts: int = 1) -> StragglerTracker:
    return StragglerTracker(engines, fraction=0.5, patience=patience, max_restarts=max_restarts)


def test_an_engine_under_the_fraction_for_patience_rounds_is_drained_and_restarted() -> None:
    stragglers, totals = tracker(), Totals(3)
    assert stragglers.after_round(totals.round(100, 100, 40)) == []  # slow once: patience
    [straggler] = stragglers.after_round(totals.round(100, 100, 40))
    assert (straggler.index, straggler.rate, straggler.median) == (2, 40.0, 100.0)
    assert (straggler.restart, straggler.action) == (True, "drained and restarted")
    assert stragglers.drained(2)
    assert stragglers.paces[2].restarts == 1
    assert stragglers.paces[2].rate is None  # its old rate no longer counts

    stragglers.restarted(2)
    assert not stragglers.drained(2)


def test_a_straggler_out_of_restarts_stays_drained() -> None:
    stragglers, totals = tracker(patience=1, max_restarts=1), Totals(3)
    [first] = stragglers.after_round(totals.round(100, 100, 10))
    assert first.action == "drained and restarted"
    stragglers.restarted(first.index)
    [second] = stragglers.after_round(totals.round(100, 100, 10))
    assert (second.index, second.restart, second.action) == (2, False, "stays drained")
    assert stragglers.drained(2)
    assert stragglers.paces[2].restarts == 1
    assert stragglers.after_round(totals.round(100, 100, 0)) == []  # drained: left alone


def test_a_fast_round_resets_the_count() -> None:
    stragglers, totals = tracker(patience=2), Totals(3)
    assert stragglers.after_round(totals.round(100, 100, 10)) == []
    assert stragglers.after_round(totals.round(100, 100, 100)) == []
    assert stragglers.after_round(totals.round(100, 100, 10)) == []  # one slow round again
    assert stragglers.paces[2].slow_rounds == 1


def test_rates_come_from_the_work_since_the_last_round() -> None:
    stragglers = tracker(engines=2, patience=10)
    stragglers.after_round([Throughput(100, 1.0), Throughput(100, 1.0)])
    stragglers.after_round([Throughput(400, 2.0), Throughput(150, 2.0)])
    assert [p.rate for p in stragglers.paces] == [300.0, 50.0]
    # An engine that did nothing this round keeps its last rate.
    stragglers.after_round([Throughput(700, 3.0), Throughput(150, 2.0)])
    assert [p.rate for p in stragglers.paces] == [300.0, 50.0]


def test_an_engine_alone_is_never_a_straggler() -> None:
    stragglers, totals = tracker(engines=2, patience=1), Totals(2)
    assert stragglers.after_round(totals.round(100, 0)) == []  # one rate: no median
    assert stragglers.after_round(totals.round(100, 0)) == []


def test_the_median_leaves_drained_engines_out() -> None:
    stragglers, totals = tracker(engines=4, patience=1, max_restarts=0), Totals(4)
    [slow] = stragglers.after_round(totals.round(100, 100, 100, 10))
    assert (slow.index, slow.restart) == (3, False)
    # Engine 3 is drained and does nothing; the median of the other three is 60.
    [next_slow] = stragglers.after_round(totals.round(100, 60, 20, 0))
    assert (next_slow.index, next_slow.median) == (2, 60.0)


def test_the_flag_event_names_the_engine_and_its_version() -> None:
    handle = EngineHandle(client=None, tokenizer=None, name="r-engine-1", weight_version=4)  # type: ignore[arg-type]
    flagged = engine_flagged("run", handle, 40.0, 100.0, "stays drained")
    assert (flagged.run_id, flagged.engine, flagged.policy_version) == ("run", "r-engine-1", 4)
    assert (flagged.tokens_per_second, flagged.fleet_median) == (40.0, 100.0)
    assert flagged.action == "stays drained"
