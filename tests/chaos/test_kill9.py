"""Kill -9 one piece of a running loop; the run must finish its steps with nothing lost.

Each service dies at a named kill point (libs/miles/faults.py: it SIGKILLs itself there) and
`miles run`'s supervisor starts it again alone; nats-server and redis-server are SIGKILLed from
outside mid-run and restarted on the same store and AOF. After each run, the accounting of
tests/chaos/accounting.py must show no lost and no unexpected task, no sample in two steps,
strictly increasing policy versions, the staleness bound kept and all steps committed.

The runs are strict on-policy (max_staleness 0) with fixed seeds, so every run, faults or not,
must commit bit-identical weights at every step: the baseline's sha256s are the reference.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from miles.cli.run import family
from miles.runtime import embedded
from miles.runtime.store import RunKeys

from .conftest import STEPS, Chaos, Finished

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SERVICE_KILLS = [
    pytest.param("coordinator.dispatched@7", "coordinator", id="coordinator-after-dispatch"),
    pytest.param("rollout.generating@2", "rollout", id="rollout-mid-generation"),
    pytest.param("reward.mid_batch@5", "reward", id="reward-mid-batch"),
    pytest.param("buffer.holding@3", "buffer", id="buffer-holding-groups"),
    pytest.param("buffer.published@2", "buffer", id="buffer-published-not-acked"),
    pytest.param("trainer.stepped@3", "trainer", id="trainer-before-commit"),
    pytest.param("trainer.committed@2", "trainer", id="trainer-committed-not-acked"),
]


def check(chaos: Chaos, finished: Finished, tasks: bool = True) -> list[str]:
    """The invariants; returns the sha256 of the weights of every committed step. ``tasks``:
    the run dispatches prompt tasks (offline DPO feeds pairs to the buffer instead)."""
    assert finished.returncode == 0, finished.output[-4000:]

    found = chaos.audit(finished.run_id)
    assert found.violations(STEPS, max_staleness=0) == []
    if tasks:
        assert found.acknowledged, "no task was dispatched: the accounting saw nothing"
    assert not found.dead
    return [m.weights_sha256 for m in found.manifests]


@pytest.fixture(scope="module")
def baseline(chaos: Chaos) -> list[str]:
    return check(chaos, chaos.run("baseline"))


@pytest.mark.parametrize(("point", "service"), SERVICE_KILLS)
def test_service_killed_at(chaos: Chaos, baseline: list[str], point: str, service: str) -> None:
    run_id = point.split("@")[0].replace(".", "-")
    finished = chaos.run(run_id, crash_at=point)
    assert chaos.marker(run_id).exists(), f"{point} was never reached: nothing was tested"
    assert finished.summary["restarts"][service] >= 1
    weights = check(chaos, finished)
    assert weights == baseline, "a fault changed what was trained"


@pytest.mark.extended
@pytest.mark.parametrize(
    ("point", "service"),
    [
        pytest.param("buffer.published@2", "buffer", id="buffer-published-not-acked"),
        pytest.param("trainer.committed@2", "trainer", id="trainer-committed-not-acked"),
    ],
)
def test_batches_by_reference_survive_kills(
    chaos: Chaos, baseline: list[str], point: str, service: str
) -> None:
    """buffer.inline_batch_bytes = 0: every batch's samples go through the blob store. A buffer
    killed after publishing one publishes it again (finding the blob written); a trainer killed
    after committing one re-announces it. Exactly once, the same weights, and no batch blob
    left behind."""
    run_id = "by-reference-" + point.split("@")[0].replace(".", "-")
    finished = chaos.run(run_id, crash_at=point, settings=["buffer.inline_batch_bytes=0"])
    assert chaos.marker(run_id).exists(), f"{point} was never reached: nothing was tested"
    assert finished.summary["restarts"][service] >= 1
    assert "(by reference)" in finished.log("buffer")
    assert check(chaos, finished) == baseline, "a fault changed what was trained"
    assert not list((finished.run_dir / "blobs" / "batches").iterdir())


SEVERAL_UPDATES = ["algorithm.ppo_epochs=2", "algorithm.mini_batches=2"]


def test_trainer_killed_mid_batch_with_several_updates_per_batch(chaos: Chaos) -> None:
    """Four optimizer steps per batch (2 epochs x 2 mini-batches): a trainer killed before the
    commit retrains the whole batch from the last manifest, and every step's weights equal the
    same run's without the fault."""
    reference = check(chaos, chaos.run("several-updates", settings=SEVERAL_UPDATES))
    run_id = "several-updates-killed"
    finished = chaos.run(run_id, crash_at="trainer.stepped@3", settings=SEVERAL_UPDATES)
    assert chaos.marker(run_id).exists(), "trainer.stepped was never reached"
    assert finished.summary["restarts"]["trainer"] >= 1
    assert check(chaos, finished) == reference


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_trainer_killed_before_commit_with_a_critic_or_a_reference(
    chaos: Chaos, algorithm: str
) -> None:
    """PPO: the critic's weights and moments come back from the trainer's state with the
    policy's. DPO: pairs go from the coordinator straight to the buffer, and the batch is
    retrained against the same frozen reference. Either way, bit for bit."""
    settings = [f"algorithm.name='{algorithm}'"]
    tasks = algorithm != "dpo"  # offline DPO dispatches no prompt task
    reference = check(chaos, chaos.run(algorithm, settings=settings), tasks=tasks)
    run_id = f"{algorithm}-killed"
    finished = chaos.run(run_id, crash_at="trainer.stepped@3", settings=settings)
    assert chaos.marker(run_id).exists(), "trainer.stepped was never reached"
    assert finished.summary["restarts"]["trainer"] >= 1
    assert check(chaos, finished, tasks=tasks) == reference


def _wait_for_step(redis_url: str, run_id: str, step: int) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if int(client.get(RunKeys(run_id).latest) or 0) >= step:
            break
        time.sleep(0.2)
    client.close()


def _kill_when(chaos: Chaos, run_id: str, server: str, at_step: int) -> None:
    """SIGKILL the server once the run committed ``at_step``; start it again on its store."""
    target = chaos.nats if server == "nats" else chaos.redis
    _wait_for_step(chaos.redis.url, run_id, at_step)
    target.stop(kill=True)
    time.sleep(1.0)
    target.restart()


@pytest.mark.parametrize("server", ["nats", "redis"])
def test_server_killed_and_restarted_on_its_store(
    chaos: Chaos, baseline: list[str], server: str
) -> None:
    run_id = f"{server}-kill"
    finished = chaos.run(run_id, during=lambda _: _kill_when(chaos, run_id, server, at_step=2))
    weights = check(chaos, finished)
    assert weights == baseline


def test_interrupted_run_resumes_from_its_latest_manifest(
    chaos: Chaos, baseline: list[str]
) -> None:
    """Ctrl-C `miles run` mid-run (embedded servers), then `miles run --resume`: the same run
    id goes on from the latest manifest, no step repeated, the dataset cursor kept."""
    run_id = "resumed"
    run_dir = chaos.root / run_id

    def interrupt(process: subprocess.Popen[str]) -> None:
        _wait_for_step(_embedded_admin_redis(run_dir), run_id, 2)
        process.send_signal(signal.SIGINT)

    first = chaos.run(run_id, during=interrupt, embedded_servers=True)
    assert first.returncode == 130, first.output[-3000:]
    assert f"miles run --resume {run_id}" in first.output
    second = chaos.run(run_id, embedded_servers=True, resume=True)
    assert second.returncode == 0, second.output[-4000:]
    assert "resuming run" in second.output
    trainer_log = second.log("trainer")
    assert "trainer resumed at step" in trainer_log
    resumed_at = int(trainer_log.split("trainer resumed at step ")[-1].split()[0])
    assert 2 <= resumed_at < STEPS

    assert "redis://" not in (run_dir / "config.json").read_text()  # admin's URL stays out
    assert _read_back(chaos, Finished(run_id, run_dir, 0, "", {})) == baseline


def test_embedded_redis_killed_is_restarted_with_each_service_s_user(
    chaos: Chaos, baseline: list[str]
) -> None:
    """`miles run` embeds its servers, each service on its own ACL user: redis-server SIGKILLed
    mid-run comes back on its AOF and ACL file (the launcher restarts it), and every service
    goes on without a denial (scripts reloaded into the empty script cache included)."""
    run_id = "embedded-redis-kill"
    run_dir = chaos.root / run_id
    killed: list[int] = []

    def kill_redis(process: subprocess.Popen[str]) -> None:
        _wait_for_step(_embedded_admin_redis(run_dir), run_id, 2)
        for pid in family(process.pid):
            with contextlib.suppress(OSError):
                if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

    finished = chaos.run(run_id, during=kill_redis, embedded_servers=True)
    assert killed, "no embedded redis-server was found: nothing was tested"
    assert finished.summary["restarts"]["redis-server"] == 1
    for service in ("coordinator", "rollout", "reward", "buffer", "trainer"):
        assert "NOPERM" not in finished.log(service), service
    assert "Violation" not in (run_dir / "nats" / "nats.log").read_text()
    assert _read_back(chaos, finished) == baseline


def _embedded_admin_redis(run_dir: Path) -> str:
    """The admin's URL of the redis-server `miles run` embedded in ``run_dir``, once started."""
    while not (run_dir / "redis" / "urls.json").exists():
        time.sleep(0.2)
    _, url = embedded.service_urls(run_dir, embedded.ADMIN)
    assert url is not None
    return url


def _read_back(chaos: Chaos, finished: Finished) -> list[str]:
    """``check`` of a run whose servers `miles run` embedded: read back from their own store
    and AOF, as the run left them."""
    nats = embedded.start_nats(finished.run_dir / "nats")
    store = embedded.start_redis(finished.run_dir / "redis")
    try:
        return check(Chaos(nats, store, chaos.ray_address, chaos.root), finished)
    finally:
        nats.stop()
        store.stop()


def test_trainer_actor_killed_is_restarted_by_ray_and_resumed(
    chaos: Chaos, baseline: list[str]
) -> None:
    """SIGKILL the trainer's Ray actor worker (as the OOM killer would) after step 2: Ray
    restarts it with the base model, the trainer service (not restarted) notices, loads the
    latest manifest into it and trains on, bit for bit."""
    run_id = "trainer-actor-kill"
    killed: list[int] = []

    def kill_actor(_: subprocess.Popen[str]) -> None:
        _wait_for_step(chaos.redis.url, run_id, 2)
        for pid in _processes_titled("ray::TrainerActor"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    finished = chaos.run(run_id, during=kill_actor)
    assert killed, "no trainer actor process was found: nothing was tested"
    assert finished.summary["restarts"]["trainer"] == 0, "the service restarted, not the actor"
    assert "trainer actor lost its weights" in finished.log("trainer")
    assert check(chaos, finished) == baseline


def _processes_titled(prefix: str) -> list[int]:
    """Processes whose title (Ray sets it: ``ray::<Actor>.<method>``) starts with ``prefix``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(prefix):
            found.append(int(cmdline.parent.name))
    return found
