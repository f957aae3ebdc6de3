"""The addition demo's task module: tokenizer, problems, reward and the cached warm start."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TASK_PATH = Path(__file__).resolve().parents[3] / "examples" / "addition" / "task.py"


@pytest.fixture(scope="module")
def task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("addition_task", TASK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tokenizer_round_trips_offline(
    task: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task.build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    ids = tokenizer.encode("123+45=")
    assert len(ids) == 7  # one token per character, and no EOS appended to a prompt
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == "123+45="
    assert tokenizer.decode([*tokenizer.encode("861"), tokenizer.eos_token_id]) == "861<eos>"
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "<eos>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_answer_is_the_reversed_sum(task: ModuleType) -> None:
    assert task.answer(57, 68) == "521"  # 125
    assert task.answer(0, 0) == "0"
    assert task.answer(5, 5) == "01"
    for a, b in [(0, 7), (99, 99), (123, 877), (40, 2)]:
        assert task.answer(a, b) == str(a + b)[::-1]


def test_sloppy_teacher_drops_carries(task: ModuleType) -> None:
    rng = random.Random(0)
    assert task.answer(57, 68, carry_drop=1.0, rng=rng) == "51"  # 7+8 -> 5, 5+6 -> 1, no carries
    assert task.answer(12, 34, carry_drop=1.0, rng=rng) == "64"  # nothing to drop
    assert task.answer(57, 68, carry_drop=0.0, rng=rng) == "521"


def test_splits_are_disjoint_distinct_and_deterministic(task: ModuleType) -> None:
    train = task.make_problems(2000, seed=0, digits=2, split="train")
    held_out = task.make_problems(200, seed=0, digits=2, split="eval")
    other_seed = task.make_problems(200, seed=1, digits=2, split="eval")

    prompts = {problem["prompt"] for problem in train}
    assert len(prompts) == len(train)
    assert prompts.isdisjoint(p["prompt"] for p in held_out)
    assert prompts.isdisjoint(p["prompt"] for p in other_seed)
    assert held_out == task.make_problems(200, seed=0, digits=2, split="eval")
    for problem in held_out:
        a, b = map(int, problem["prompt"].removesuffix("=").split("+"))
        assert problem["label"] == str(a + b)[::-1]


def test_make_problems_rejects_impossible_requests(task: ModuleType) -> None:
    with pytest.raises(ValueError, match="cannot draw"):
        task.make_problems(20, seed=0, digits=1, split="eval")  # about 10 pairs are held out
    with pytest.raises(ValueError, match="split"):
        task.make_problems(1, seed=0, digits=2, split="test")


@pytest.mark.parametrize(
    ("completion", "label", "expected"),
    [
        ("521", "521", 1.0),
        ("521<eos>", "521", 1.0),
        ("521<eos>7", "521", 1.0),
        (" 521\n", "521", 1.0),
        ("125", "521", 0.0),  # the sum written most-significant first
        ("52", "521", 0.0),
        ("5210", "521", 0.0),
        ("", "521", 0.0),
        ("<eos>521", "521", 0.0),
    ],
)
def test_reward_is_exact_match(
    task: ModuleType, completion: str, label: str, expected: float
) -> None:
    assert task.reward(completion, label) == expected


def test_write_splits(task: ModuleType, tmp_path: Path) -> None:
    task.write_splits(tmp_path, train=30, eval=5, seed=0, digits=2)
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 30
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 5


def test_preference_pairs_reject_a_wrong_answer(task: ModuleType) -> None:
    problems = task.make_problems(200, seed=0, digits=2)
    pairs = task.preference_pairs(problems, seed=0)
    assert [p["chosen"] for p in pairs] == [p["label"] for p in problems]
    assert all(p["rejected"] != p["chosen"] for p in pairs)
    assert all(task.reward(p["rejected"], p["chosen"]) == 0.0 for p in pairs)
    # 57+68: every carry forgotten: 7+8 -> 5, then 5+6 -> 1, and no third digit
    assert task.preference_pairs([{"prompt": "57+68=", "label": "521"}], 0)[0]["rejected"] == "51"


def test_warm_start_saves_a_loadable_model_and_is_cached(task: ModuleType, tmp_path: Path) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    directory = task.warm_start(tmp_path / "warm", steps=2, digits=1, batch_size=8)
    weights = directory / "model.safetensors"
    first_write = weights.stat().st_mtime_ns

    assert task.warm_start(tmp_path / "warm", steps=2, digits=1, batch_size=8) == directory
    assert weights.stat().st_mtime_ns == first_write  # the cache hit did not retrain

    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    accuracy = task.greedy_accuracy(model, tokenizer, task.make_problems(5, 0, 1, "eval"))
    assert 0.0 <= accuracy <= 1.0
