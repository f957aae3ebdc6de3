"""Fixtures of the contract suites: each test runs against the real server ("nats", an
integration test, its server started only for those params) and the in-memory twin ("memory",
milliseconds)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from contract.bus_harness import BusHarness, MemoryBusHarness, NatsBusHarness
from contract.record_harness import MemoryRecordHarness, RecordHarness, RedisRecordHarness

from miles.runtime.bus import Bus, connect_nats


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("nats", id="nats", marks=pytest.mark.integration),
    ]
)
async def bus_harness(request: pytest.FixtureRequest) -> AsyncIterator[BusHarness]:
    made: BusHarness
    if request.param == "nats":
        server = request.getfixturevalue("nats_server")  # started only for the nats params
        made = NatsBusHarness(await connect_nats(server.url, 5, name="contract-probe"), server.url)
    else:
        made = MemoryBusHarness()
    yield made
    await made.close()


@pytest.fixture
async def bus(bus_harness: BusHarness) -> Bus:
    """The probe service's bus, on a run whose topology exists."""
    made = await bus_harness.connect("probe")
    await made.ensure_topology()
    return made


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("redis", id="redis", marks=pytest.mark.integration),
    ]
)
async def record_harness(request: pytest.FixtureRequest) -> AsyncIterator[RecordHarness]:
    made: RecordHarness
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")  # started only for the redis params
        made = RedisRecordHarness(server.url)
    else:
        made = MemoryRecordHarness()
    yield made
    await made.close()
