"""Shared fixtures: real nats-server and redis-server on free loopback ports, started per test
module so tests are isolated and the chaos tests can kill them; a real local Ray per session."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from miles.runtime import embedded


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.Server]:
    server = embedded.start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.Server]:
    server = embedded.start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import ray

    from miles.runtime import raycluster

    run_dir = tmp_path_factory.mktemp("ray")
    address = raycluster.start_local(run_dir, num_cpus=4)
    yield address
    ray.shutdown()
    link = raycluster.ray_temp_dir(run_dir)
    if link.is_symlink():
        link.unlink()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
async def redis_client(redis_server: embedded.Server) -> AsyncIterator[object]:
    from miles.runtime.store import connect_redis

    client = await connect_redis(redis_server.url, 5)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Llama and the addition tokenizer, saved like a real model."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "addition"))
    import task  # type: ignore[import-not-found]

    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = task.build_tokenizer(directory)
    task.make_model(tokenizer, seed=0).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def addition_task() -> ModuleType:
    """examples/addition/task.py, loaded by path under its own name: the character tokenizer
    (with a chat template when asked), the tiny Llama and the warm start."""
    path = Path(__file__).parents[1] / "examples" / "addition" / "task.py"
    spec = importlib.util.spec_from_file_location("miles_tests_addition_task", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
