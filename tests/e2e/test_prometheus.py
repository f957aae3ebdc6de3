"""A real Prometheus scraped a short `miles run`: PromQL over its HTTP API returns numbers for
the reward quantiles, the bleed ratio and the time per phase, and every metric deploy/'s
dashboards and alert rules query was really exported by the running services."""

from __future__ import annotations

import math

import pytest
from observability import PROMETHEUS_SERIES, deployed_queries, promql_metric_names
from observed import STEPS, ObservedRun, Prometheus

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WINDOW = "[10m]"  # longer than the run: range functions see every sample it left
ENGINE_METRICS = {"miles_engine_tokens_per_second", "miles_engine_straggler"}
"""Set by the rollout fleet's per-engine throughput tracking (services/rollout/fleet.py)."""
GPU_METRICS = {"miles_phase_gpu_utilisation_ratio"}
"""Exported only where NVML finds a GPU."""


@pytest.fixture(scope="module")
def prometheus(observed_run: ObservedRun) -> Prometheus:
    if observed_run.prometheus is None:
        pytest.skip(observed_run.prometheus_missing)
    return observed_run.prometheus


def test_every_service_was_scraped(prometheus: Prometheus) -> None:
    jobs = prometheus.query(f"max by (job) (max_over_time(up{WINDOW}))")
    assert {key: value for key, value in jobs.items()} == {
        f'{{"job": "{service}"}}': 1.0
        for service in ("buffer", "coordinator", "reward", "rollout", "trainer")
    }


def test_reward_quantiles(prometheus: Prometheus) -> None:
    # Over the whole finished run, not a rate: the reward service's counters are cumulative
    # since it started, and `increase()` drops whatever was counted before Prometheus's first
    # scrape of it. On a loaded machine that first scrape can come after every reward of this
    # short run was scored, and `increase()` is then 0 in every bucket (quantile NaN). The
    # dashboards use rates over a window, which is right for a live run.
    for quantile in (0.1, 0.5, 0.9):
        found = prometheus.query(
            f"histogram_quantile({quantile}, sum by (le, reward_fn) "
            f"(last_over_time(miles_reward_bucket{WINDOW})))"
        )
        assert list(found) == ['{"reward_fn": "exact_answer"}'], found
        value = found['{"reward_fn": "exact_answer"}']
        # Exact-match rewards are 0 or 1; a quantile is interpolated inside its bucket, and a
        # reward of 0 lies in the bucket (-0.25, 0].
        assert -0.25 <= value <= 1.0, (quantile, value)
    mean = prometheus.query(
        f"sum by (reward_fn) (last_over_time(miles_reward_running_sum{WINDOW}))"
        f" / sum by (reward_fn) (last_over_time(miles_reward_count{WINDOW}))"
    )
    assert 0.0 < mean['{"reward_fn": "exact_answer"}'] < 1.0, mean


def test_bleed_ratio(prometheus: Prometheus) -> None:
    found = prometheus.query(f"max by (side) (max_over_time(miles_bleed_ratio{WINDOW}))")
    sides = {key: value for key, value in found.items()}
    assert set(sides) == {
        '{"side": "trainer_waiting_for_data"}',
        '{"side": "rollout_waiting_for_weights"}',
    }, found
    for value in sides.values():
        assert 0.0 <= value <= 1.0


def test_time_per_phase(prometheus: Prometheus) -> None:
    found = prometheus.query(f"sum by (phase) (max_over_time(miles_phase_seconds_total{WINDOW}))")
    seconds = {key.split('"')[3]: value for key, value in found.items()}
    for phase in (
        "rollout",
        "reward",
        "buffer_wait",
        "train_forward_backward",
        "optimizer",
        "weight_publish",
        "weight_load",
        "checkpoint",
    ):
        assert seconds.get(phase, 0.0) > 0, (phase, seconds)
    assert all(math.isfinite(value) for value in seconds.values())
    steps = prometheus.query(f"max(max_over_time(miles_steps_committed_total{WINDOW}))")
    assert list(steps.values()) == [STEPS]
    cpu = prometheus.query(f"sum(max_over_time(miles_phase_cpu_seconds_total{WINDOW}))")
    (cpu_seconds,) = cpu.values()
    assert cpu_seconds > 0


def test_dashboards_and_alerts_query_only_scraped_metrics(prometheus: Prometheus) -> None:
    """Each metric a dashboard panel or alert rule names was in a real scrape of the run."""
    scraped = prometheus.metric_names() | PROMETHEUS_SERIES
    missing: dict[str, set[str]] = {}
    for where, expr in deployed_queries():
        unknown = promql_metric_names(expr) - scraped - ENGINE_METRICS - GPU_METRICS
        if unknown:
            missing.setdefault(where, set()).update(unknown)
    assert not missing, missing


def test_rules_load_in_prometheus(prometheus: Prometheus) -> None:
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 9
    assert all(rule["health"] != "err" for rule in rules), rules


def test_engine_metrics_scraped(prometheus: Prometheus) -> None:
    assert prometheus.metric_names() >= ENGINE_METRICS
