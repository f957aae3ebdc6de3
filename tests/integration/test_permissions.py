"""Least privilege, enforced by real servers: nats-server and redis-server configured from the
permissions table, once as `miles run` embeds them and once from deploy/'s files rendered by
deploy/render.sh as the containers start them.

Clients without credentials are refused; every publish, subscription and Redis access the table
does not grant is denied (NATS's permissions violation, Redis's NOPERM); and the five services,
each on its own credentials, run a whole loop (weights through the Object Store, evaluations,
checkpoint collection) without one denial, after which the operator reads the run and exports
it."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
import pytest_asyncio
import redis
import redis.exceptions
from access_checks import (
    may_publish,
    may_read,
    may_subscribe,
    may_write,
    publish_subjects,
    run_keys,
    subscribe_subjects,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

from miles.cli.export import export
from miles.config import MilesConfig, load_config
from miles.recipe import load_recipe
from miles.runtime import embedded
from miles.runtime.checkpoint import Manifest, Manifests
from miles.runtime.permissions import IDENTITIES, OPERATOR, rights
from miles.runtime.run_view import RunView
from miles.runtime.service import SERVICES, run_service
from miles.runtime.store import connect_redis, list_runs
from services.registry import service_main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
RUN = "least-privilege"
TABLE = rights(RUN)


@dataclass
class Servers:
    """A nats-server and a redis-server configured from the table, and each identity's URLs."""

    nats_urls: dict[str, str]
    redis_urls: dict[str, str]
    nats_port: int
    redis_port: int
    processes: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for process in self.processes:
            embedded.stop_process(process, timeout=10)


def start_embedded(directory: Path, run_id: str) -> tuple[Servers, Path]:
    """As `miles run` starts them: the nats log, to look for violations, comes back too."""
    nats_server = embedded.start_nats(directory / "nats", run_id=run_id)
    redis_server = embedded.start_redis(directory / "redis", run_id=run_id)
    urls = {i: embedded.service_urls(directory, i) for i in (*IDENTITIES, embedded.ADMIN)}
    servers = Servers(
        {i: nats_url for i, (nats_url, _) in urls.items() if nats_url},
        {i: redis_url for i, (_, redis_url) in urls.items() if redis_url},
        nats_server.port,
        redis_server.port,
        [nats_server.process, redis_server.process],
    )
    return servers, directory / "nats" / "nats.log"


def start_deployed(directory: Path) -> Servers:
    """deploy/nats and deploy/redis rendered by deploy/render.sh, as the containers do, started
    on free loopback ports (flags override the files) and with the data in ``directory``."""
    passwords = {(s, i): secrets.token_hex(16) for s in ("NATS", "REDIS") for i in IDENTITIES}
    env = os.environ | {"MILES_RUN_ID": RUN}
    env |= {f"{system}_{i.upper()}_PASSWORD": p for (system, i), p in passwords.items()}
    rendered = {}
    for server in ("nats", "redis"):
        rendered[server] = directory / f"{server}-conf"
        source = ROOT / "deploy" / server
        render = ["sh", str(ROOT / "deploy" / "render.sh"), str(source), str(rendered[server])]
        subprocess.run([*render, "true"], env=env, check=True)
    # The containers' data directory is /data; nats-server and redis-server refuse to take
    # another on the command line over the one in the file.
    for path, line in (
        (rendered["nats"] / "nats.conf", 'store_dir: "/data"'),
        (rendered["redis"] / "redis.conf", "dir /data"),
    ):
        path.write_text(path.read_text().replace(line, line.replace("/data", str(directory))))
    nats_port, monitor_port, redis_port = (embedded.free_port() for _ in range(3))
    nats_process = subprocess.Popen(
        [
            embedded.find_binary("nats-server", wheel_first=True),
            *("-c", str(rendered["nats"] / "nats.conf"), "-a", "127.0.0.1"),
            *("-p", str(nats_port), "-m", str(monitor_port)),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=sys.stderr,
    )
    redis_process = subprocess.Popen(
        [
            embedded.find_binary("redis-server"),
            str(rendered["redis"] / "redis.conf"),
            *("--aclfile", str(rendered["redis"] / "users.acl")),
            *("--bind", "127.0.0.1", "--port", str(redis_port)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=sys.stderr,
    )
    embedded.wait_for_port(nats_port, nats_process, 20, "nats-server")
    embedded.wait_for_port(redis_port, redis_process, 20, "redis-server")
    return Servers(
        {i: f"nats://{i}:{passwords['NATS', i]}@127.0.0.1:{nats_port}" for i in IDENTITIES},
        {i: f"redis://{i}:{passwords['REDIS', i]}@127.0.0.1:{redis_port}/0" for i in IDENTITIES},
        nats_port,
        redis_port,
        [nats_process, redis_process],
    )


@pytest.fixture(scope="module", params=["embedded", "deploy"])
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp(request.param)
    started = (
        start_embedded(directory, RUN)[0]
        if request.param == "embedded"
        else start_deployed(directory)
    )
    yield started
    started.stop()


async def test_clients_without_credentials_are_refused(servers: Servers) -> None:
    async def quiet(exc: Exception) -> None:
        pass

    for url in (
        f"nats://127.0.0.1:{servers.nats_port}",
        f"nats://rollout:not-its-password@127.0.0.1:{servers.nats_port}",
    ):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, connect_timeout=3, error_cb=quiet)

    once = Retry(NoBackoff(), 0)  # redis-py retries a refused AUTH for seconds otherwise
    anonymous = redis.Redis(port=servers.redis_port, retry=once)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    for password in ("", "anything"):  # the default user is off, whatever its password
        default = redis.Redis(
            port=servers.redis_port, username="default", password=password, retry=once
        )
        with pytest.raises(redis.exceptions.AuthenticationError, match="disabled"):
            default.ping()


@pytest.mark.parametrize("identity", IDENTITIES)
async def test_each_forbidden_publish_and_subscription_is_denied(
    servers: Servers, identity: str
) -> None:
    """Every subject of the catalogue is tried: the server refuses exactly those the table does
    not grant (so the grants are what the server reads too), with a permissions violation
    that nats-py hands to the error callback (a publish has no reply to fail)."""
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    expected = [
        f'nats: permissions violation for publish to "{subject}"'.lower()
        for subject in publish_subjects(RUN)
        if not may_publish(TABLE[identity], subject)
    ] + [
        f'nats: permissions violation for subscription to "{subject}"'.lower()
        for subject in subscribe_subjects(RUN)
        if not may_subscribe(TABLE[identity], subject)
    ]
    nc = await nats.connect(servers.nats_urls[identity], error_cb=on_error)
    try:
        for subject in publish_subjects(RUN):
            await nc.publish(subject, b"{}")
        for subject in subscribe_subjects(RUN):
            await nc.subscribe(subject)
        await nc.flush()
        # The errors may reach the callback after the flush's PONG: wait for them, and a little
        # longer for any the table does not expect.
        deadline = time.monotonic() + 5
        while len(violations) < len(expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    assert sorted(violations) == sorted(expected)
    if identity == "rollout":
        assert any('"miles.least-privilege.batches"' in v for v in violations)
        assert any('"miles.least-privilege.weights"' in v for v in violations)
        assert any('"miles.least-privilege.control.stop"' in v for v in violations)


@pytest.mark.parametrize("identity", IDENTITIES)
def test_each_forbidden_redis_access_gets_noperm(servers: Servers, identity: str) -> None:
    """A write the identity may send, on each key it may not write; a read on each key it may
    not read: Redis answers NOPERM for the key."""
    client = redis.Redis.from_url(servers.redis_urls[identity])
    commands = TABLE[identity].redis.commands
    write = ("SET", "v") if "set" in commands else ("HSET", "field", "v")
    read = ("GET",) if "get" in commands else ("HGET", "field")
    refused = 0
    for key in run_keys(RUN):
        if not may_write(TABLE[identity], key):
            with pytest.raises(redis.exceptions.NoPermissionError, match="access one of the keys"):
                client.execute_command(write[0], key, *write[1:])
            refused += 1
        if not may_read(TABLE[identity], key):
            with pytest.raises(redis.exceptions.NoPermissionError, match="access one of the keys"):
                client.execute_command(read[0], key, *read[1:])
    assert refused >= 12  # every identity owns only a few of the run's keys
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command("FLUSHALL")


def _manifest(step: int) -> Manifest:
    return Manifest(
        run_id=RUN,
        step=step,
        policy_version=step,
        weights_uri="file:///nowhere",
        weights_sha256="0" * 64,
        state_uri=None,
        state_sha256=None,
        state_step=0,
        batch_ids=[f"b{step}"],
        task_ids=[],
        sample_ids=[],
        dataset_cursor=0,
        rng_state="",
        config_hash="",
        samples=0,
        min_sample_version=0,
        reward_mean=0.0,
        metrics={},
        seconds={},
    )


async def test_only_the_trainer_commits_a_step(servers: Servers) -> None:
    for identity in IDENTITIES:
        client = await connect_redis(servers.redis_urls[identity], 5)
        try:
            manifests = Manifests(client, RUN)
            if identity != "trainer":
                with pytest.raises(redis.exceptions.NoPermissionError):
                    await manifests.commit(_manifest(1))
                continue
            await manifests.commit(_manifest(1))
            assert await manifests.latest_step() == 1
        finally:
            await client.aclose()


# --- the services at work -------------------------------------------------------------------------

RECIPE = """
import miles


@miles.reward
def parity(sample: miles.Sample) -> float:
    # Not a task, a signal with variance: groups of a random model are rarely all alike.
    return float(sum(sample.response_ids) % 2)
"""
JOB_RUN = "least-privilege-job"
STEPS = 3


@pytest_asyncio.fixture
async def job_servers(tmp_path: Path) -> AsyncIterator[tuple[Servers, Path]]:
    started, nats_log = start_embedded(tmp_path / "servers", JOB_RUN)
    yield started, nats_log
    started.stop()


def _config(servers: Servers, identity: str, overrides: list[str]) -> MilesConfig:
    return load_config(
        overrides=[
            f'infra.nats_url="{servers.nats_urls[identity]}"',
            f'infra.redis_url="{servers.redis_urls[identity]}"',
            *overrides,
        ]
    )


async def test_each_service_does_its_job_on_its_own_credentials(
    job_servers: tuple[Servers, Path], ray_cluster: str, tiny_model: Path, tmp_path: Path
) -> None:
    servers, nats_log = job_servers
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(10, 30)
        )
    )
    held_out.write_text(json.dumps({"prompt": "12+34=", "label": "46"}) + "\n")
    (tmp_path / "recipe.py").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.py")
    overrides = [
        f'model.path="{tiny_model}"',
        f'infra.ray_address="{ray_cluster}"',
        f'data.train_path="{train}"',
        f'data.eval_path="{held_out}"',
        'infra.blob_store="nats"',  # weights through the Object Store: its rights too
        f"run.steps={STEPS}",
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "rollout.engine_threads=1",
        "trainer.threads=1",
        "trainer.keep_checkpoints=1",  # step 1's files are collected: deletes and purges
        "buffer.groups_per_batch=2",
        "coordinator.eval_every=2",
        "coordinator.heartbeat_seconds=0.2",
    ]
    run_dir = tmp_path / JOB_RUN
    running = [
        asyncio.create_task(
            run_service(
                s, service_main(s), _config(servers, s, overrides), recipe, JOB_RUN, run_dir
            )
        )
        for s in SERVICES
    ]
    done, pending = await asyncio.wait(running, timeout=300)
    for task in pending:
        task.cancel()
    assert not pending, "the run did not finish within 300 s"
    for task in done:
        task.result()  # a service that crashed on a denial fails here

    operator = redis.Redis.from_url(servers.redis_urls[OPERATOR], decode_responses=True)
    view = RunView.read(operator, JOB_RUN)  # what `miles status` shows
    assert (view.record.status, view.step) == ("finished", STEPS)
    assert view.dead_letters == {} and view.evals
    reader = await connect_redis(servers.redis_urls[OPERATOR], 5)
    assert JOB_RUN in await list_runs(reader)  # `miles status` without a run lists them
    await reader.aclose()
    exported = await export(
        JOB_RUN,
        run_dir,
        _config(servers, OPERATOR, overrides),
        step=None,
        dtype="fp32",
        out=tmp_path / "exported",
        redis_url=servers.redis_urls[OPERATOR],
        nats_url=servers.nats_urls[OPERATOR],
    )
    assert exported.step == STEPS and (exported.path / "model.safetensors").is_file()

    assert "Violation" not in nats_log.read_text()
    admin = redis.Redis.from_url(servers.redis_urls[embedded.ADMIN], decode_responses=True)
    denials = [entry for entry in admin.acl_log() if entry["object"] != "client|setinfo"]
    assert denials == []
