"""The trajectory builder a multi-turn rollout uses, against an in-memory engine: model turns
are the engine's ids and logprobs as they came, tool turns are masked, and the sample says so."""

from __future__ import annotations

import pytest

import miles
from miles.config import RolloutConfig
from miles.engine.generation import EngineHandle, default_rollout, sampling_for
from miles.engine.protocol import GenerateOutput, GenerateRequest
from miles.engine.trajectory import Trajectory
from miles.events import Task, Turn

CONFIG = RolloutConfig(max_new_tokens=4, temperature=1.0)
OFFSET = 1000
"""The scripted engine's ids: ``OFFSET + ord(char)``, never what the tokenizer would give for
the same text, so a re-tokenized model turn would show."""


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i % OFFSET) for i in ids)


class ScriptedClient:
    """Answers the ``n``-th request of each sample (rid ``t/i`` or ``t/i/n``) with the ``n``-th
    text of the script, token by token at logprob -0.5, capped at ``max_new_tokens``."""

    def __init__(self, script: list[str], version: int = 3) -> None:
        self.script = script
        self.version = version
        self.calls: list[list[GenerateRequest]] = []

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        self.calls.append(requests)
        outputs = []
        for request in requests:
            turn = int(request.rid.split("/")[2]) if request.rid.count("/") == 2 else 0
            text = self.script[turn][: request.sampling_params.max_new_tokens]
            outputs.append(
                GenerateOutput(
                    rid=request.rid,
                    output_ids=[OFFSET + ord(char) for char in text],
                    text=text,
                    output_token_logprobs=[-0.5] * len(text),
                    finish_reason="stop" if text == self.script[turn] else "length",
                    weight_version=self.version,
                    prompt_tokens=len(request.input_ids),
                    completion_tokens=len(text),
                )
            )
        return outputs


def make_task(group_size: int = 2) -> Task:
    return Task(
        run_id="run",
        policy_version=3,
        task_id="t7",
        prompt="12+9=",
        label="12",
        metadata={"source": "unit"},
        group_size=group_size,
        seed=5,
    )


def handle(client: ScriptedClient) -> EngineHandle:
    return EngineHandle(client, CharTokenizer(), "e0", weight_version=3)  # type: ignore[arg-type]


async def test_model_turns_are_trained_and_tool_turns_masked() -> None:
    client = ScriptedClient(["?", "12"])
    task = make_task()
    trajectory = handle(client).trajectory(task, 1, CONFIG)

    assert await trajectory.generate() == "?"
    assert trajectory.append("[21]") == [ord(c) for c in "[21]"]
    assert await trajectory.generate() == "12"
    sample = trajectory.sample()

    prompt = [ord(c) for c in "12+9="]
    assert sample.prompt_ids == prompt
    # The second turn continues from the prompt, the first turn's own ids and the tool's.
    second = client.calls[1][0]
    assert second.input_ids == prompt + [OFFSET + ord("?")] + [ord(c) for c in "[21]"]
    assert sample.response_ids == [OFFSET + ord("?"), *map(ord, "[21]"), OFFSET + 49, OFFSET + 50]
    assert sample.response_logprobs == [-0.5, 0.0, 0.0, 0.0, 0.0, -0.5, -0.5]
    assert sample.loss_mask == [1, 0, 0, 0, 0, 1, 1]
    assert sample.turns == [
        Turn(role="assistant", start=0, end=1, trained=True, text="?"),
        Turn(role="tool", start=1, end=5, trained=False, text="[21]"),
        Turn(role="assistant", start=5, end=7, trained=True, text="12"),
    ]
    assert sample.response_text == "?[21]12"
    assert sample.sample_id == "t7/1" and sample.finish_reason == "stop"
    assert (sample.label, sample.metadata, sample.prompt) == ("12", {"source": "unit"}, "12+9=")
    assert sample.policy_version_first == sample.policy_version_last == 3


async def test_a_one_turn_trajectory_is_the_default_rollouts_sample() -> None:
    task = make_task(group_size=2)
    engine = handle(ScriptedClient(["21"]))
    expected = await default_rollout(engine, task, CONFIG)
    built = []
    for index in range(2):
        trajectory = Trajectory(engine, task, index, CONFIG)
        await trajectory.generate()
        built.append(trajectory.sample())
    for sample, reference in zip(built, expected, strict=True):
        assert sample.loss_mask == [1, 1] and [t.role for t in sample.turns] == ["assistant"]
        assert miles.Sample(**{**_fields(sample), "loss_mask": [], "turns": []}) == reference


def _fields(sample: miles.Sample) -> dict[str, object]:
    return {name: getattr(sample, name) for name in sample.__struct_fields__}


async def test_each_turn_has_its_own_stable_seed_and_overrides_apply() -> None:
    client = ScriptedClient(["?", "12", "3"])
    task = make_task()
    for _ in range(2):  # a redelivered task asks for the same seeds
        trajectory = handle(client).trajectory(task, 0, CONFIG)
        await trajectory.generate(stop_token_ids=[OFFSET + ord("?")])
        trajectory.append("[21]")
        await trajectory.generate(temperature=0.5)
        await trajectory.generate()
    first, second = client.calls[:3], client.calls[3:]
    seeds = [call[0].sampling_params.sampling_seed for call in first]
    assert seeds == [call[0].sampling_params.sampling_seed for call in second]
    assert seeds[0] == sampling_for(task, 0, CONFIG).sampling_seed  # turn 0: the default's
    assert len(set(seeds)) == 3
    assert [call[0].rid for call in first] == ["t7/0", "t7/0/1", "t7/0/2"]
    params = [call[0].sampling_params for call in first]
    assert params[0].stop_token_ids == [OFFSET + ord("?")] and params[1].stop_token_ids == []
    assert params[1].temperature == 0.5 and params[2].temperature == 1.0


async def test_max_response_tokens_bounds_the_whole_response() -> None:
    client = ScriptedClient(["?", "123456"])
    trajectory = handle(client).trajectory(make_task(), 0, CONFIG, max_response_tokens=6)
    await trajectory.generate()
    assert trajectory.remaining == 5
    trajectory.append("[1234]")  # 6 tokens, cut to the 5 left
    assert trajectory.turns[-1].text == "[1234" and trajectory.remaining == 0
    assert await trajectory.generate() == ""  # full: the engine is not called
    assert len(client.calls) == 1
    sample = trajectory.sample()
    assert len(sample.response_ids) == 6 and sample.finish_reason == "length"

    # A model turn gets at most what is left (here 2, under max_new_tokens = 4).
    trajectory = handle(client).trajectory(make_task(), 1, CONFIG, max_response_tokens=4)
    await trajectory.generate()
    trajectory.append([ord(",")])
    assert await trajectory.generate() == "12"
    assert client.calls[-1][0].sampling_params.max_new_tokens == 2
    assert trajectory.sample().finish_reason == "length"


async def test_generate_all_batches_the_next_turn_into_one_engine_call() -> None:
    client = ScriptedClient(["?", "12"])
    engine, task = handle(client), make_task(group_size=3)
    trajectories = [engine.trajectory(task, i, CONFIG) for i in range(3)]
    assert await Trajectory.generate_all(trajectories) == ["?", "?", "?"]
    trajectories[1].append("[21]")
    assert await Trajectory.generate_all(trajectories[1:2]) == ["12"]
    assert [[r.rid for r in call] for call in client.calls] == [
        ["t7/0", "t7/1", "t7/2"],
        ["t7/1/1"],
    ]
    other = handle(client).trajectory(task, 0, CONFIG)
    with pytest.raises(ValueError, match="one engine"):
        await Trajectory.generate_all([trajectories[0], other])


async def test_versions_span_an_update_and_a_sample_needs_a_model_turn() -> None:
    client = ScriptedClient(["?", "12"], version=3)
    engine = handle(client)
    trajectory = engine.trajectory(make_task(), 0, CONFIG)
    with pytest.raises(ValueError, match="t7/0: a sample needs at least one model turn"):
        trajectory.sample()
    await trajectory.generate()
    client.version = engine.weight_version = 4  # the engine took new weights in between
    await trajectory.generate()
    sample = trajectory.sample()
    assert (sample.policy_version_first, sample.policy_version_last) == (3, 4)
