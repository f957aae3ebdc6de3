"""The calculator demo: its tool, its demonstrations, and its multi-turn rollout and reward on
a real (untrained) model through the in-process engine."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
from transformers import AutoTokenizer

from miles.engine.generation import EngineHandle
from miles.engine.in_process import InProcessClient
from miles.engine.protocol import GenerateOutput, GenerateRequest
from miles.engine.transformers_engine import TransformersEngine
from miles.events import Task
from miles.recipe import Recipe, load_recipe

RECIPE = Path(__file__).resolve().parents[3] / "examples" / "calculator" / "recipe.py"


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[Recipe, ModuleType]]:
    """The recipe and the ``task`` module it imports: another example's ``task`` may be in
    ``sys.modules`` already (tests/conftest.py imports examples/addition's), so it is set
    aside while the recipe loads, and put back after."""
    other = sys.modules.pop("task", None)
    try:
        recipe = load_recipe(RECIPE)
        yield recipe, sys.modules["task"]
    finally:
        sys.modules.pop("task", None)
        if other is not None:
            sys.modules["task"] = other


@pytest.fixture(scope="module")
def recipe(loaded: tuple[Recipe, ModuleType]) -> Recipe:
    return loaded[0]


@pytest.fixture(scope="module")
def task(loaded: tuple[Recipe, ModuleType]) -> ModuleType:
    module = loaded[1]
    assert Path(module.__file__ or "").parent == RECIPE.parent
    return module


def test_the_calculator_answers_in_the_models_notation(task: ModuleType) -> None:
    assert task.calculator("57+68=") == "[521]"
    assert task.calculator("0+0=") == "[0]"
    assert task.reward("521", "521") == 1.0 and task.reward("52", "521") == 0.0


def test_demonstrations_train_the_call_and_the_copy_but_not_the_tools_reply(
    task: ModuleType, tmp_path: Path
) -> None:
    tokenizer = task.build_tokenizer(tmp_path)
    rng = random.Random(0)
    call = task.teacher("57+68=", rng, call_rate=1.0, carry_drop=0.6)
    assert call == [("?", True), ("[521]", False), ("521<eos>", True)]
    direct = task.teacher("57+68=", random.Random(1), call_rate=0.0, carry_drop=1.0)
    assert direct == [("51<eos>", True)]  # both carries forgotten
    batch = task.supervised_batch(tokenizer, [("57+68=", call)])
    labels = batch["labels"][0].tolist()
    text = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    trained = [token for token, label in zip(text, labels, strict=True) if label != -100]
    assert trained == ["?", "5", "2", "1", "<eos>"]


class ScriptedClient:
    """First turns call the tool for even sample indices and answer "7" for odd ones; second
    turns write "521" + eos."""

    def __init__(self, call_id: int, eos_id: int, digit_ids: dict[str, int]) -> None:
        self.call_id, self.eos_id, self.digit_ids = call_id, eos_id, digit_ids
        self.calls: list[list[str]] = []

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        self.calls.append([r.rid for r in requests])
        outputs = []
        for request in requests:
            second = request.rid.count("/") == 2
            index = int(request.rid.split("/")[1])
            if second:
                ids, text = [*(self.digit_ids[c] for c in "521"), self.eos_id], "521"
            elif index % 2 == 0:
                assert request.sampling_params.stop_token_ids == [self.call_id]
                ids, text = [self.call_id], "?"
            else:
                ids, text = [self.digit_ids["7"], self.eos_id], "7"
            outputs.append(
                GenerateOutput(
                    rid=request.rid,
                    output_ids=ids,
                    text=text,
                    output_token_logprobs=[-0.1] * len(ids),
                    finish_reason="stop",
                    weight_version=0,
                    prompt_tokens=len(request.input_ids),
                    completion_tokens=len(ids),
                )
            )
        return outputs


async def test_the_rollout_calls_the_tool_in_two_batched_turns_and_rewards_the_answer(
    recipe: Recipe, task: ModuleType, tmp_path: Path
) -> None:
    tokenizer = task.build_tokenizer(tmp_path)
    digits = {c: tokenizer.convert_tokens_to_ids(c) for c in "0123456789"}
    client = ScriptedClient(tokenizer.convert_tokens_to_ids("?"), tokenizer.eos_token_id, digits)
    engine = EngineHandle(client, tokenizer, "e0", weight_version=0)  # type: ignore[arg-type]
    problem = Task(
        run_id="r", policy_version=0, task_id="t3", prompt="57+68=", label="521", group_size=4
    )
    samples = await recipe.rollout(engine, problem, recipe.config.rollout)  # type: ignore[misc]

    assert client.calls == [["t3/0", "t3/1", "t3/2", "t3/3"], ["t3/0/1", "t3/2/1"]]
    assert [s.response_text for s in samples] == ["?[521]521", "7", "?[521]521", "7"]
    assert [[t.role for t in s.turns] for s in samples[:2]] == [
        ["assistant", "tool", "assistant"],
        ["assistant"],
    ]
    assert samples[0].loss_mask == [1, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert [recipe.rewards["exact_answer"](s) for s in samples] == [1.0, 0.0, 1.0, 0.0]
    # A single completion (no turns: the preflight's, or the default rollout's) is all answer.
    single = msgspec.structs.replace(samples[1], turns=[], response_text="521")
    assert recipe.rewards["exact_answer"](single) == 1.0


async def test_the_rollout_runs_on_a_real_engine(
    recipe: Recipe, task: ModuleType, tmp_path: Path
) -> None:
    """An untrained model through the in-process engine: whatever it writes, every sample is
    well formed (one turn, or three), its mask fits, and greedy eval tasks get one sample."""
    tokenizer = task.build_tokenizer(tmp_path)
    task.make_model(tokenizer).save_pretrained(str(tmp_path))
    client = InProcessClient(TransformersEngine(str(tmp_path), threads=1))
    engine = EngineHandle(client, AutoTokenizer.from_pretrained(tmp_path), "e0", 0)
    try:
        for greedy, count in ((False, 8), (True, 1)):
            problem = Task(
                run_id="r",
                policy_version=0,
                task_id="t0",
                prompt="57+68=",
                label="521",
                group_size=8,
                greedy=greedy,
            )
            samples = await recipe.rollout(engine, problem, recipe.config.rollout)  # type: ignore[misc]
            assert len(samples) == count
            for sample in samples:
                assert len(sample.turns) in (1, 3)
                assert len(sample.loss_mask) == len(sample.response_ids)
                assert len(sample.response_ids) <= 16
    finally:
        await client.aclose()
