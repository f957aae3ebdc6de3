"""A batch of tasks shared over the engines, each share generated, each group assembled."""

from __future__ import annotations

from miles import events
from miles.config import RolloutConfig
from miles.engine.generation import EngineHandle, to_sample
from miles.engine.protocol import GenerateOutput, GenerateRequest, SamplingParams
from services.rollout.groups import Generated, Share, group_of, share_out


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(char) for char in text]


class EchoClient:
    """An engine that answers every request with its prompt's first token, at version 2."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        self.calls.append([r.rid for r in requests])
        return [
            GenerateOutput(
                rid=r.rid,
                output_ids=r.input_ids[:1],
                text="x",
                output_token_logprobs=[-0.5],
                finish_reason="stop",
                weight_version=2,
                prompt_tokens=len(r.input_ids),
                completion_tokens=1,
            )
            for r in requests
        ]


def task(index: int, group_size: int = 2, split: events.Split = "train") -> events.Task:
    return events.Task(
        run_id="run",
        policy_version=2,
        task_id=f"t{index}",
        prompt=f"{index}+1=",
        group_size=group_size,
        split=split,
        eval_round=-1 if split == "train" else 3,
    )


def engine(client: EchoClient, name: str = "r-engine-0") -> EngineHandle:
    return EngineHandle(client, CharTokenizer(), name, weight_version=2)  # type: ignore[arg-type]


def test_share_out_is_round_robin_and_some_engines_may_get_nothing() -> None:
    batch = [(task(i), f"msg{i}") for i in range(5)]
    config = RolloutConfig()
    shares = share_out(batch, 3, None, config)  # type: ignore[arg-type]
    assert [[t.task_id for t in s.tasks] for s in shares] == [["t0", "t3"], ["t1", "t4"], ["t2"]]
    assert [m for _, m in shares[0].items] == ["msg0", "msg3"]
    few = share_out(batch[:1], 3, None, config)  # type: ignore[arg-type]
    assert [len(s.items) for s in few] == [1, 0, 0]


async def test_the_default_rollout_makes_one_engine_call_per_share() -> None:
    client = EchoClient()
    share = Share([(task(0), None), (task(1), None)], None, RolloutConfig())  # type: ignore[list-item]
    generated = await share(engine(client))
    assert client.calls == [["t0/0", "t0/1", "t1/0", "t1/1"]]
    assert [[s.sample_id for s in g] for g in generated.groups] == [
        ["t0/0", "t0/1"],
        ["t1/0", "t1/1"],
    ]
    assert generated.engine == "r-engine-0" and generated.seconds >= 0


async def test_a_custom_rollout_runs_once_per_task() -> None:
    seen: list[str] = []

    async def solve(
        handle: EngineHandle, t: events.Task, config: RolloutConfig
    ) -> list[events.Sample]:
        seen.append(t.task_id)
        params = SamplingParams(max_new_tokens=config.max_new_tokens)
        request = GenerateRequest(rid=f"{t.task_id}/0", input_ids=[1, 2], sampling_params=params)
        [output] = await handle.generate([request])
        return [to_sample(t, 0, [1, 2], output)]

    share = Share([(task(0), None), (task(1), None)], solve, RolloutConfig())  # type: ignore[list-item]
    generated = await share(engine(EchoClient()))
    assert seen == ["t0", "t1"]
    assert [[s.sample_id for s in g] for g in generated.groups] == [["t0/0"], ["t1/0"]]


async def test_an_empty_share_generates_nothing() -> None:
    client = EchoClient()
    generated = await Share([], None, RolloutConfig())(engine(client, "r-engine-2"))
    assert generated == Generated([], 0.0, "r-engine-2")
    assert client.calls == []


def test_a_group_carries_its_task_and_the_oldest_version_its_samples_began_on() -> None:
    def sample(index: int, first: int) -> events.Sample:
        return events.Sample(
            sample_id=f"t7/{index}",
            prompt="7+1=",
            label="8",
            prompt_ids=[1],
            response_ids=[2],
            response_logprobs=[-1.0],
            response_text="x",
            finish_reason="stop",
            policy_version_first=first,
            policy_version_last=4,
        )

    samples = [sample(0, 4), sample(1, 3)]
    generated = Generated([samples], 1.5, "r-engine-1")
    group = group_of("run", task(7, split="eval"), samples, generated)
    assert (group.run_id, group.task_id, group.split, group.eval_round) == ("run", "t7", "eval", 3)
    assert (group.policy_version, group.engine, group.generate_seconds) == (3, "r-engine-1", 1.5)
    assert group.samples == samples
