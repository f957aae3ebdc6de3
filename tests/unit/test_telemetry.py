"""miles.telemetry: trace-context propagation, the no-exporter default, metric naming, and that
every metric the dashboards and alerts query is one the services export."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import yaml
from observability import PROMETHEUS_SERIES, deployed_queries, promql_metric_names
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from miles import events, telemetry
from miles.telemetry import record, tracing
from miles.telemetry.metrics import LazyGauge, parse_series_key, series_key
from miles.telemetry.readout import Readout

DEPLOY = Path(__file__).parents[2] / "deploy"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


@pytest.fixture
def current_span() -> Iterator[SpanContext]:
    """A sampled span context made current, as if a message had been received under it."""
    span_context = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(span_context)))
    yield span_context
    otel_context.detach(token)


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)


def test_public_api() -> None:
    assert sorted(telemetry.__all__) == [
        "BleedSide",
        "Family",
        "Metrics",
        "Phase",
        "current_traceparent",
        "extract",
        "inject",
        "link_from_headers",
        "link_from_traceparent",
        "linked_span",
        "links_from",
        "process_span",
        "record_span",
        "root_span",
        "send_span",
        "setup_tracing",
        "shutdown_tracing",
        "span",
        "start_metrics_server",
    ]


# --- tracing ----------------------------------------------------------------------------------


def test_inject_extract_round_trip(current_span: SpanContext) -> None:
    headers = telemetry.inject({"Nats-Msg-Id": "group-1"})
    assert headers["Nats-Msg-Id"] == "group-1"
    assert headers["traceparent"] == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"

    extracted = trace.get_current_span(telemetry.extract(headers)).get_span_context()
    assert (extracted.trace_id, extracted.span_id) == (TRACE_ID, SPAN_ID)
    assert extracted.is_remote and extracted.trace_flags.sampled


def test_extract_without_context_is_empty() -> None:
    for headers in (None, {}, {"Nats-Msg-Id": "x"}, {"traceparent": "garbage"}):
        assert not trace.get_current_span(telemetry.extract(headers)).get_span_context().is_valid


def test_traceparent_round_trip(current_span: SpanContext) -> None:
    traceparent = telemetry.current_traceparent()
    assert traceparent == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
    link = telemetry.link_from_traceparent(traceparent)
    assert link is not None
    assert (link.context.trace_id, link.context.span_id) == (TRACE_ID, SPAN_ID)


def test_no_traceparent_without_a_span() -> None:
    assert telemetry.current_traceparent() is None
    assert telemetry.link_from_traceparent(None) is None
    assert telemetry.link_from_traceparent("") is None
    assert telemetry.link_from_traceparent("00-zz-zz-01") is None


def test_links_from_keeps_only_valid_contexts() -> None:
    other = f"00-{1:032x}-{2:016x}-01"
    links = telemetry.links_from(
        headers=[{"traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"}, None, {}],
        traceparents=[other, None, ""],
    )
    assert [(link.context.trace_id, link.context.span_id) for link in links] == [
        (TRACE_ID, SPAN_ID),
        (1, 2),
    ]


def test_no_exporter_means_no_op(no_otel_env: None) -> None:
    telemetry.setup_tracing("rollout", "run-1", "host-1")
    assert tracing._provider is None
    assert not isinstance(trace.get_tracer_provider(), tracing.TracerProvider)
    headers: dict[str, str] = {}
    with telemetry.send_span("miles.r.tasks", "task-1", headers) as span:
        assert not span.is_recording()
    assert "traceparent" not in headers


def test_no_op_passes_the_incoming_context_through(no_otel_env: None) -> None:
    """A service with tracing off must not cut the trace of the services around it."""
    incoming = {"traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"}
    with telemetry.process_span("miles.r.tasks", "task-1", "rollout", incoming) as span:
        assert not span.is_recording()
        headers = telemetry.inject({})
    assert headers["traceparent"] == incoming["traceparent"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("OTEL_TRACES_EXPORTER", "zipkin"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
)
def test_unsupported_exporter_is_a_clear_error(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=value):
        tracing._exporters_from_env()


def test_exporter_selection(no_otel_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracing._exporters_from_env() == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing._exporters_from_env() == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert [type(e).__name__ for e in tracing._exporters_from_env()] == ["ConsoleSpanExporter"]
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert [type(e).__name__ for e in tracing._exporters_from_env()] == ["OTLPSpanExporter"]
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing._exporters_from_env() == []


# --- metrics ----------------------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
UNITS = ("seconds", "bytes")
NOT_BASE_UNITS = re.compile(r"(milli|micro|nano|_ms|_us|minute|hour|percent|_kb|_mb|_gb)")


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose, samples or not yet."""
    return {
        family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]
    }


def exercised(metrics: telemetry.Metrics) -> set[str]:
    """The sample names a registry really exports once every metric has a value.

    Not ``exported_names``: prometheus-client leaves out what a type would suggest (no
    ``_sum`` for a histogram with negative buckets), and only a real sample counts.
    """
    for metric in vars(metrics).values():
        if isinstance(metric, telemetry.Family):
            metric = metric.labels(**dict.fromkeys(metric.label_names, "x"))
        if isinstance(metric, Histogram):
            metric.observe(1.0)
        elif isinstance(metric, (Counter, Gauge, LazyGauge)):
            metric.inc()
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_metric_names_follow_the_conventions() -> None:
    metrics = telemetry.Metrics("trainer", "run-1")
    families = list(metrics.registry.collect())
    assert len(families) > 30
    for family in families:
        name = family.name
        assert name.startswith("miles_"), name
        assert not NOT_BASE_UNITS.search(name), f"{name}: use base units"
        assert not name.endswith("_total"), f"{name}: only counters end in _total"
        words = name.removesuffix("_per_second").split("_")  # a rate gauge says so in full
        for unit in UNITS:
            if unit in words or unit.removesuffix("s") in words:
                assert words[-1] == unit, f"{name}: the unit, plural, is the last word"
        if "ratio" in words:
            assert family.type == "gauge" and name.endswith("_ratio"), name
    # prometheus-client appends _total to counters in the exposition
    text = _scrape(metrics.registry)
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line


def test_application_metrics_carry_run_and_service() -> None:
    metrics = telemetry.Metrics("buffer", "run-7")
    metrics.buffer_depth.set(3)
    metrics.groups_filtered.labels(reason="zero_variance").inc()
    text = _scrape(metrics.registry)
    assert 'miles_buffer_depth{run_id="run-7",service="buffer"} 3.0' in text
    assert (
        'miles_groups_filtered_total{reason="zero_variance",run_id="run-7",service="buffer"} 1.0'
        in text
    )


def test_phase_bleed_and_consumer_info() -> None:
    metrics = telemetry.Metrics("trainer", "run-1")
    with metrics.phase("optimizer"):
        sum(i * i for i in range(200_000))
    registry = metrics.registry
    labels = {"run_id": "run-1", "service": "trainer", "phase": "optimizer"}
    wall = registry.get_sample_value("miles_phase_seconds_total", labels)
    cpu = registry.get_sample_value("miles_phase_cpu_seconds_total", labels)
    assert wall is not None and wall > 0
    assert cpu is not None and cpu > 0

    metrics.observe_bleed("trainer_waiting_for_data", waiting_seconds=3, wall_seconds=2)
    metrics.observe_bleed("rollout_waiting_for_weights", waiting_seconds=1, wall_seconds=4)
    bleed = {"run_id": "run-1", "service": "trainer"}
    side = "trainer_waiting_for_data"
    assert registry.get_sample_value("miles_bleed_ratio", {**bleed, "side": side}) == 1.0
    side = "rollout_waiting_for_weights"
    assert registry.get_sample_value("miles_bleed_ratio", {**bleed, "side": side}) == 0.25

    metrics.set_consumer_info("MILES_r_SCORED", "buffer", pending=5, ack_pending=2, redelivered=1)
    consumer = {**bleed, "stream": "MILES_r_SCORED", "consumer": "buffer"}
    assert registry.get_sample_value("miles_consumer_pending_messages", consumer) == 5
    assert registry.get_sample_value("miles_consumer_ack_pending_messages", consumer) == 2
    assert registry.get_sample_value("miles_consumer_redelivered_messages", consumer) == 1

    metrics.commit_step(step=4, policy_version=4, duration_seconds=1.5)
    assert registry.get_sample_value("miles_step", bleed) == 4
    assert registry.get_sample_value("miles_steps_committed_total", bleed) == 1
    assert registry.get_sample_value("miles_step_duration_seconds_sum", bleed) == 1.5


def test_reward_buckets_cover_both_reward_ranges() -> None:
    metrics = telemetry.Metrics("reward", "run-1")
    for reward in (-1.0, 0.0, 0.5, 1.0):
        metrics.reward.labels(reward_fn="exact").observe(reward)
    labels = {"run_id": "run-1", "service": "reward", "reward_fn": "exact"}

    def below(bound: str) -> float | None:
        return metrics.registry.get_sample_value("miles_reward_bucket", {**labels, "le": bound})

    assert (below("-1.0"), below("0.0"), below("0.5"), below("1.0")) == (1, 2, 3, 4)


def test_metrics_server_on_a_free_port() -> None:
    metrics = telemetry.Metrics("reward", "run-1")
    metrics.samples_scored.inc(2)
    port = telemetry.start_metrics_server(0, metrics.registry, addr="127.0.0.1")
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'miles_samples_scored_total{run_id="run-1",service="reward"} 2.0' in text
    assert "python_gc" not in text  # the dedicated registry, not the global default


def _scrape(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# --- dashboards and alerts query only what the services export ----------------------------------


def test_promql_tokenizer() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, reward_fn) (rate(miles_reward_bucket{run_id="$run_id",'
        'reason=~"a|b"}[$__rate_interval]))) / on (run_id) group_left sum without (x) '
        "(rate(miles_reward_count[1h] offset 15m)) > 1e3 and time() - miles_step > bool 0.5"
    )
    assert promql_metric_names(expr) == {"miles_reward_bucket", "miles_reward_count", "miles_step"}


def test_dashboards_and_alerts_query_exported_metrics() -> None:
    exported = exercised(telemetry.Metrics("trainer", "run-1"))
    exported |= PROMETHEUS_SERIES
    queries = deployed_queries()
    assert len(queries) > 40
    used: set[str] = set()
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: unknown {sorted(names - exported)} in {expr!r}"
        used |= names
    # the dashboard shows every row the issue asks for
    for metric in (
        "miles_reward_bucket",
        "miles_train_loss",
        "miles_train_kl",
        "miles_train_entropy",
        "miles_train_grad_norm",
        "miles_sample_staleness_bucket",
        "miles_phase_seconds_total",
        "miles_bleed_ratio",
        "miles_engine_tokens_per_second",
        "miles_engine_straggler",
        "miles_consumer_pending_messages",
        "miles_dead_letters_total",
    ):
        assert metric in used, metric


def test_prometheus_scrapes_the_five_services() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {
        job["job_name"]: (job["dns_sd_configs"][0]["names"], job["dns_sd_configs"][0]["port"])
        for job in config["scrape_configs"]
    }
    assert jobs == {
        "coordinator": (["coordinator"], 9101),
        "rollout": (["rollout"], 9102),
        "reward": (["reward"], 9103),
        "buffer": (["buffer"], 9104),
        "trainer": (["trainer"], 9105),
    }


# --- what a heartbeat carries, and reading it back ---------------------------------------------


def test_snapshot_round_trips_through_series_keys() -> None:
    metrics = telemetry.Metrics("trainer", "run-1")
    metrics.bleed_ratio.labels(side="trainer_waiting_for_data").set(0.25)
    metrics.steps_committed.inc(3)
    snapshot = metrics.snapshot()
    assert snapshot['miles_bleed_ratio{side="trainer_waiting_for_data"}'] == 0.25
    assert snapshot["miles_steps_committed_total"] == 3
    assert not any(key.endswith("_created") for key in snapshot)
    for key in snapshot:
        name, labels = parse_series_key(key)
        assert series_key(name, labels) == key
        assert "run_id" not in labels and "service" not in labels


def test_gauges_are_exported_once_set() -> None:
    """A reward process must not export ``miles_train_loss 0``: max() across services would
    then read 0 whatever the trainer's (negative) loss is."""
    metrics = telemetry.Metrics("reward", "run-1")
    assert "miles_train_loss" not in metrics.snapshot()
    metrics.train_loss.set(-0.5)
    assert metrics.snapshot()["miles_train_loss"] == -0.5


def test_process_metrics_carry_run_and_service() -> None:
    metrics = telemetry.Metrics("buffer", "run-7")
    labels = {"run_id": "run-7", "service": "buffer"}
    cpu = metrics.registry.get_sample_value("miles_process_cpu_seconds_total", labels)
    assert cpu is not None and cpu > 0


def test_reward_mean_comes_from_the_running_sum() -> None:
    metrics = telemetry.Metrics("reward", "run-1")
    group = events.ScoredGroup(
        run_id="run-1", policy_version=0, task_id="t0", split="train", eval_round=-1, samples=[]
    )
    record.scored(metrics, group, [{"exact": 1.0}, {"exact": -1.0}, {"exact": 0.5}, {}])
    snapshot = metrics.snapshot()
    assert 'miles_reward_sum{reward_fn="exact"}' not in snapshot  # negative buckets: no _sum
    assert snapshot['miles_reward_running_sum{reward_fn="exact"}'] == 0.5
    assert snapshot['miles_reward_count{reward_fn="exact"}'] == 3
    evaluation = msgspec.structs.replace(group, split="eval")
    record.scored(metrics, evaluation, [{"exact": 1.0}])  # held out: counted, not in the histogram
    assert metrics.snapshot()['miles_reward_count{reward_fn="exact"}'] == 3


def test_trained_records_signals_and_splits_cpu_by_phase() -> None:
    metrics = telemetry.Metrics("trainer", "run-1")
    samples = [
        events.TrainSample(
            sample_id=f"t0/{i}",
            prompt_ids=[1],
            response_ids=[2, 3],
            response_logprobs=[-0.5, -1.5],
            advantage=0.0,
            reward=1.0,
            policy_version=version,
        )
        for i, version in enumerate((3, 2))
    ]
    result = {
        "loss": -0.1,
        "grad_norm": 2.0,
        "seconds_forward_backward": 3.0,
        "seconds_optimizer": 1.0,
        "cpu_seconds": 8.0,
    }
    record.trained(metrics, samples, result, version=3)
    snapshot = metrics.snapshot()
    assert snapshot["miles_train_loss"] == -0.1
    assert snapshot["miles_train_entropy"] == 1.0  # mean of -logprob over sampled tokens
    assert snapshot["miles_sample_staleness_sum"] == 1  # versions 3 and 2 trained at 3
    cpu = 'miles_phase_cpu_seconds_total{phase="%s"}'
    assert (snapshot[cpu % "train_forward_backward"], snapshot[cpu % "optimizer"]) == (6.0, 2.0)


def test_reward_histogram_counts_per_bucket() -> None:
    counts = record.reward_histogram([0.0, 1.0, 1.0, -3.0, 7.0, 0.05])
    assert counts["0.0"] == 1 and counts["1.0"] == 2 and counts["0.1"] == 1
    assert counts["-1.0"] == 1 and counts["+Inf"] == 1
    assert sum(counts.values()) == 6


def test_bleed_window() -> None:
    metrics = telemetry.Metrics("trainer", "run-1")
    window = record.BleedWindow(metrics, "trainer_waiting_for_data")
    with window.waiting():
        time.sleep(0.05)
    time.sleep(0.05)
    window.close()
    labels = {"run_id": "run-1", "service": "trainer", "side": "trainer_waiting_for_data"}
    ratio = metrics.registry.get_sample_value("miles_bleed_ratio", labels)
    assert ratio is not None and 0.3 < ratio < 0.7
    assert window.waited == 0.0  # the next window starts empty


def beat(service: str, instance: str, at: float, metrics: dict[str, float]) -> dict:
    return {"service": service, "instance": instance, "time": at, "metrics": metrics}


def test_readout_sums_counters_and_reads_current_gauges() -> None:
    bleed = 'miles_bleed_ratio{side="trainer_waiting_for_data"}'
    phase = 'miles_phase_seconds_total{phase="rollout"}'
    beats = [
        # a crashed rollout's last beat, and its restarted successor: counters add up
        beat("rollout", "old", 100.0, {phase: 5.0, "miles_policy_version": 1}),
        beat("rollout", "new", 200.0, {phase: 2.0, "miles_policy_version": 4}),
        beat("trainer", "t", 200.0, {bleed: 0.4, "miles_policy_version": 4}),
        beat(
            "reward",
            "r",
            200.0,
            {
                'miles_reward_running_sum{reward_fn="exact"}': 3.0,
                'miles_reward_count{reward_fn="exact"}': 4.0,
            },
        ),
        beat("coordinator", "c", 200.0, {'miles_restarts_total{restarted_service="rollout"}': 1}),
    ]
    key = Readout(beats).key_metrics()
    assert key["phase_seconds"] == {"rollout": 7.0}
    assert key["policy_version"] == 4  # the stale instance's gauge is not current
    assert key["bleed_ratio"] == {
        "trainer_waiting_for_data": 0.4,
        "rollout_waiting_for_weights": None,
    }
    assert key["reward_mean"] == 0.75
    assert key["restarts"] == {"rollout": 1}


def _multi_turn_sample(index: int, roles: list[str]) -> events.Sample:
    turns, mask = [], []
    for role in roles:
        trained = role == "assistant"
        turns.append(events.Turn(role=role, start=len(mask), end=len(mask) + 2, trained=trained))
        mask += [int(trained)] * 2
    return events.Sample(
        sample_id=f"t0/{index}",
        prompt="1+1=",
        label="2",
        prompt_ids=[1, 2],
        response_ids=[3] * len(mask),
        response_logprobs=[-0.5 if m else 0.0 for m in mask],
        response_text="",
        finish_reason="stop",
        policy_version_first=1,
        policy_version_last=1,
        loss_mask=mask,
        turns=turns,
    )


def test_a_multi_turn_group_records_its_turns_and_only_the_policys_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(
        tracing,
        "record_span",
        lambda name, start, end, attributes: spans.append((name, attributes)),
    )
    metrics = telemetry.Metrics("rollout", "run-1")
    samples = [
        _multi_turn_sample(0, ["assistant", "tool", "assistant"]),
        _multi_turn_sample(1, ["assistant"]),
    ]
    group = events.GeneratedGroup(
        run_id="run-1",
        policy_version=1,
        task_id="t0",
        split="train",
        eval_round=-1,
        samples=samples,
        engine="e0",
    )
    record.generated(metrics, group, 0, 1)
    [(name, attributes)] = spans
    assert name == "generate"
    assert attributes["miles.turns"] == ["assistant tool assistant", "assistant"]
    assert attributes["gen_ai.usage.output_tokens"] == 6  # the tool's 2 tokens were not generated
    assert metrics.snapshot()['miles_tokens_generated_total{engine="e0"}'] == 6


def test_turns_are_counted_per_role_and_tool_tokens_leave_the_entropy_estimate() -> None:
    samples = [
        events.TrainSample(
            sample_id=s.sample_id,
            prompt_ids=s.prompt_ids,
            response_ids=s.response_ids,
            response_logprobs=s.response_logprobs,
            advantage=0.0,
            reward=0.0,
            policy_version=1,
            loss_mask=s.loss_mask,
            turns=s.turns,
        )
        for s in (
            _multi_turn_sample(0, ["assistant", "tool", "assistant"]),
            _multi_turn_sample(1, ["assistant"]),
        )
    ]
    assert record.turn_counts(samples) == {"assistant": 3, "tool": 1}
    assert record.entropy_estimate(samples) == 0.5  # the tool's logprobs 0.0 are not samples
