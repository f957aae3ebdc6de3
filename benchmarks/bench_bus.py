"""Bus throughput: sample groups per second through a real JetStream publish -> pull -> ack.

Baseline: the same events through core NATS publish/subscribe (no persistence, no acks), in the
same process, so the table shows what durability costs. Also msgpack vs JSON encoding of one
group. Prints a table and writes benchmarks/results/bench_bus.json. Nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import msgspec

from miles import events
from miles.runtime import embedded
from miles.runtime.bus import Bus, connect_nats
from miles.runtime.subjects import REWARD_CONSUMER

GROUPS = 2000


def make_group(run_id: str, index: int) -> events.GeneratedGroup:
    sample = events.Sample(
        sample_id=f"t{index}/0",
        prompt="123+456=",
        label="975",
        prompt_ids=list(range(8)),
        response_ids=list(range(4)),
        response_logprobs=[-0.1] * 4,
        response_text="975",
        finish_reason="stop",
        policy_version_first=0,
        policy_version_last=0,
    )
    return events.GeneratedGroup(
        run_id=run_id,
        policy_version=0,
        task_id=f"t{index}",
        split="train",
        eval_round=-1,
        samples=[sample] * 8,
    )


async def jetstream_round_trip(bus: Bus, groups: list[events.GeneratedGroup]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(bus.publish(bus.subjects.generated, g, g.task_id) for g in groups))
    subscription = await bus.pull("generated", REWARD_CONSUMER)
    received = 0
    while received < len(groups):
        for _, msg in await bus.fetch(subscription, events.GeneratedGroup, 256, 2.0):
            await msg.ack()
            received += 1
    return time.perf_counter() - start


async def core_round_trip(bus: Bus, groups: list[events.GeneratedGroup]) -> float:
    done = asyncio.Event()
    received = 0

    async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal received
        events.decode(msg.data, events.GeneratedGroup, bus.run_id)
        received += 1
        if received == len(groups):
            done.set()

    await bus.nc.subscribe("bench.core", cb=on_message)
    start = time.perf_counter()
    for group in groups:
        await bus.nc.publish("bench.core", events.encode(group))
    await done.wait()
    return time.perf_counter() - start


def encode_seconds(group: events.GeneratedGroup, encoder, repeat: int = 5000) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(repeat):
        encoder(group)
    return (time.perf_counter() - start) / repeat


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        server = embedded.start_nats(Path(directory))
        try:
            nc = await connect_nats(server.url, 5, "bench")
            bus = Bus(nc, "bench", "bench", 8 * 1024 * 1024)
            await bus.ensure_topology()
            groups = [make_group("bench", i) for i in range(GROUPS)]
            core = await core_round_trip(bus, groups)
            durable = await jetstream_round_trip(bus, groups)
            await nc.close()
        finally:
            server.stop()
    msgpack_s = encode_seconds(groups[0], events.encode)
    json_s = encode_seconds(groups[0], msgspec.json.encode)
    rows = {
        "core_nats_groups_per_s": GROUPS / core,
        "jetstream_groups_per_s": GROUPS / durable,
        "jetstream_vs_core_ratio": core / durable,
        "msgpack_encode_us": msgpack_s * 1e6,
        "json_encode_us": json_s * 1e6,
        "msgpack_vs_json_ratio": msgpack_s / json_s,
        "msgpack_bytes": len(events.encode(groups[0])),
        "json_bytes": len(msgspec.json.encode(groups[0])),
    }
    print(f"{'metric':<28}{'value':>14}")
    for name, value in rows.items():
        print(f"{name:<28}{value:>14.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_bus.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
