"""The command line: complete help, and one clear line (not a traceback) when NATS or Redis is
missing."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from miles import events
from miles.cli.run import family
from miles.runtime import embedded
from miles.runtime.permissions import OPERATOR
from miles.runtime.service import SERVICES
from miles.runtime.subjects import Subjects

pytestmark = pytest.mark.integration
RECIPE = Path(__file__).parents[2] / "examples" / "addition" / "recipe.py"


def miles(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "miles.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | (env or {}),
    )


@pytest.mark.parametrize("command", [[], ["run"], ["serve"], ["status"], ["report"]])
def test_help_is_complete(command: list[str]) -> None:
    result = miles(*command, "--help")
    assert result.returncode == 0
    assert "usage: miles" in result.stdout
    for word in {
        (): ["run", "serve", "status", "report", "NATS_URL"],
        ("run",): ["--set", "--config"],
        ("serve",): ["coordinator", "--run-id", "--recipe"],
        ("status",): ["--redis-url", "--json"],
        ("report",): ["--redis-url", "--out", "steps.jsonl"],
    }[tuple(command)]:
        assert word in result.stdout


@pytest.mark.parametrize("missing", ["NATS_URL", "REDIS_URL"])
def test_unreachable_server_gives_one_clear_line(
    missing: str, redis_server: embedded.Server, nats_server: embedded.Server
) -> None:
    closed = f"{'nats' if missing == 'NATS_URL' else 'redis'}://127.0.0.1:{embedded.free_port()}"
    env = {"NATS_URL": nats_server.url, "REDIS_URL": redis_server.url, missing: closed}
    result = miles(
        "serve",
        "reward",
        "--recipe",
        str(RECIPE),
        "--run-id",
        "cli-test",
        "--set",
        "infra.connect_timeout_seconds=1",
        env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("miles: cannot reach") and missing in line


def test_status_reads_the_run_record(redis_server: embedded.Server) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.hset(
        "miles:run:cli-status",
        mapping={
            "run_id": "cli-status",
            "status": "running",
            "step": 3,
            "policy_version": 3,
            "started": 0,
            "reward_mean": 0.5,
        },
    )
    client.zadd("miles:runs", {"cli-status": 1})
    result = miles("status", "cli-status", "--json", env={"REDIS_URL": redis_server.url})
    assert result.returncode == 0, result.stderr
    assert '"steps": 3' in result.stdout
    missing = miles("status", "no-such-run", env={"REDIS_URL": redis_server.url})
    assert missing.returncode == 1 and "no run 'no-such-run'" in missing.stdout


def test_status_and_report_read_the_metrics_the_heartbeats_carry(
    redis_server: embedded.Server, tmp_path: Path
) -> None:
    """One source: the values a service exports on /metrics ride its heartbeat into Redis, and
    `miles status` and `miles report` (for a run still in Redis) both read them from there."""
    import json

    import msgspec
    import redis

    from miles import events
    from miles.runtime.store import RunKeys
    from miles.telemetry import Metrics

    metrics = Metrics("trainer", "cli-metrics")
    metrics.bleed_ratio.labels(side="trainer_waiting_for_data").set(0.42)
    metrics.phase_seconds.labels(phase="optimizer").inc(1.5)
    beat = events.Heartbeat(
        run_id="cli-metrics",
        policy_version=-1,
        service="trainer",
        instance="host-1",
        pid=1,
        time=1.0,
        busy_seconds=1.0,
        wait_seconds=1.0,
        processed=1,
        metrics_port=9105,
        metrics=metrics.snapshot(),
    )
    keys = RunKeys("cli-metrics")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.hset(keys.record, mapping={"run_id": "cli-metrics", "status": "running", "started": 0})
    client.hset(keys.services, "trainer/host-1", msgspec.json.encode(beat).decode())
    client.zadd("miles:runs", {"cli-metrics": 2})
    env = {"REDIS_URL": redis_server.url}

    status = miles("status", "cli-metrics", "--json", env=env)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["metrics"]
    assert shown["bleed_ratio"]["trainer_waiting_for_data"] == 0.42
    assert shown["phase_seconds"]["optimizer"] == 1.5
    table = miles("status", "cli-metrics", env=env)
    assert "42%" in table.stdout and ":9105" in table.stdout

    out = tmp_path / "report"
    made = miles("report", "cli-metrics", "--out", str(out), env=env)
    assert made.returncode == 0, made.stderr
    assert (
        "| bleed: trainer waiting for data (last step) | 42% |" in (out / "report.md").read_text()
    )


def test_sigterm_stops_the_run_its_services_and_servers(tmp_path: Path, ray_cluster: str) -> None:
    """A scheduler's SIGTERM stops `miles run` as Ctrl-C does: services and embedded servers
    stopped (none left orphaned), exit 143, and the line that resumes the run."""
    env = os.environ | {"RAY_ADDRESS": ray_cluster}
    for name in ("NATS_URL", "REDIS_URL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "miles.cli", "run", "--quiet", str(RECIPE)]
    command += ["--run-id", "termed", "--set", f"run.output_dir='{tmp_path}'"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        logs = tmp_path / "termed" / "logs"
        deadline = time.monotonic() + 120
        while not all((logs / f"{service}.log").exists() for service in SERVICES):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the services did not start in 120 s"
            time.sleep(0.2)
        started = family(process.pid) - {process.pid}
        assert len(started) >= len(SERVICES) + 2  # and nats-server, redis-server
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, output[-3000:]
    where = ["--output-dir", str(tmp_path), "--set", f"run.output_dir='{tmp_path}'"]
    resume = shlex.join(["miles", "run", "--resume", "termed", *where, "--quiet"])
    assert f"the run did not finish: SIGTERM received. Continue it with: {resume}\n" in output
    assert not [pid for pid in started if running(pid)]


def test_a_stop_control_event_ends_the_run_with_why_and_the_resume_line(
    tmp_path: Path, ray_cluster: str
) -> None:
    """Every service exits 0 on a stop control event; `miles run` says the run did not finish,
    why, and how to continue it, and exits 1 (it once printed a normal summary and no hint)."""
    env = os.environ | {"RAY_ADDRESS": ray_cluster}
    for name in ("NATS_URL", "REDIS_URL"):
        env.pop(name, None)
    where = ["--output-dir", str(tmp_path), "--set", f"run.output_dir='{tmp_path}'"]
    command = [sys.executable, "-m", "miles.cli", "run", "--quiet", str(RECIPE)]
    command += ["--run-id", "halted", *where[2:]]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        coordinator_log = tmp_path / "halted" / "logs" / "coordinator.log"
        deadline = time.monotonic() + 120
        while "run halted created" not in (
            coordinator_log.read_text() if coordinator_log.exists() else ""
        ):
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the coordinator did not start in 120 s"
            time.sleep(0.2)
        # as an operator does: config.json carries no passwords; urls.json has its own URL
        nats_url, _ = embedded.service_urls(tmp_path / "halted", OPERATOR)
        assert nats_url is not None
        asyncio.run(send_stop(nats_url, "halted", "operator: maintenance"))
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output[-3000:]
    resume = shlex.join(["miles", "run", "--resume", "halted", *where, "--quiet"])
    [ending] = [line for line in output.splitlines() if "the run did not finish" in line]
    assert ending.startswith("miles: the run did not finish: stopped by a stop control event at ")
    assert ending.endswith(f"(operator: maintenance). Continue it with: {resume}")


async def send_stop(nats_url: str, run_id: str, reason: str) -> None:
    nc = await nats.connect(nats_url)
    stop = events.Control(run_id=run_id, policy_version=0, command="stop", reason=reason)
    await nc.publish(Subjects(run_id).control("stop"), events.encode(stop))
    await nc.flush()
    await nc.close()


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for init to collect it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_service_that_fails_at_start_stops_the_run_with_its_log(
    tmp_path: Path, ray_cluster: str
) -> None:
    """SGLang's runtime is not installed here, so rollout engines cannot start: the run stops
    after one retry with the rollout log's last lines on the terminal and a resume hint, not
    after five silent restarts."""
    env = os.environ | {"RAY_ADDRESS": ray_cluster}
    for name in ("NATS_URL", "REDIS_URL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "miles.cli", "run", "--quiet", str(RECIPE)]
    command += ["--run-id", "nostart", "--set", f"run.output_dir='{tmp_path}'"]
    command += ["--set", "rollout.engine=sglang"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "rollout failed to start (exit code 1); its log ends:" in output
    assert "sglang" in output.split("its log ends:")[1]  # the cause, from the log's tail
    assert "rollout failed to start twice: stopping the run." in output
    assert "miles run --resume nostart" in output
    assert "restart #3" not in output
