"""The calculator task: addition where the model may call a calculator tool mid-answer.

The model reads ``"57+68="`` and either answers directly, least-significant digit first as in
examples/addition (``"521<eos>"`` for 125), or calls the tool by writing ``"?"``. On a call the
environment appends the calculator's result in the same notation, bracketed (``"[521]"``), and
the model's second turn writes the final answer, which it only has to copy. So a sample is
either one model turn or three turns: ``"?"`` (the model's, trained), ``"[521]"`` (the tool's,
masked out of the loss) and ``"521<eos>"`` (the model's, trained). The reward is exact match of
the final answer.

The warm start imitates a teacher that calls the tool rarely (``call_rate``, 20%) and otherwise
answers as examples/addition's sloppy teacher, forgetting each carry with probability
``carry_drop`` (0.6); after a call it always copies the tool's result. Sampling, the policy calls
the tool on about a fifth of its answers and is then right; it answers the rest directly and is
often wrong. Greedily it never calls (the first digit is more likely than ``"?"``) and is right
on about a third of held-out problems. Calls earn the reward more often than direct answers on
every problem with a carry, so GRPO raises the call rate, and once ``"?"`` is the likelier first
token, greedy answers call the tool too and held-out accuracy jumps: RL discovers that the tool
pays, though the demonstrations rarely used it.

The problems, the tokenizer, the model and the imitation loop are examples/addition's
(``task.py`` there, loaded by path): this module adds the tool, its teacher and its reward.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

_spec = importlib.util.spec_from_file_location(
    "miles_example_addition_task", Path(__file__).resolve().parents[1] / "addition" / "task.py"
)
assert _spec is not None and _spec.loader is not None
addition: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(addition)

EOS = addition.EOS
CALL = "?"
"""The model's tool call: the first turn stops on it (``stop_token_ids``)."""
TOOL_CHARACTERS = CALL + "[]"

answer = addition.answer
operands = addition.operands
make_model = addition.make_model
supervised_batch = addition.supervised_batch
reward = addition.reward
"""1.0 for exactly the final answer (text from an ``<eos>`` on ignored), else 0.0."""


def build_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """examples/addition's character tokenizer with the tool's characters."""
    return addition.build_tokenizer(directory, extra=TOOL_CHARACTERS)


def calculator(prompt: str) -> str:
    """The tool: the exact sum of ``"a+b="``, in the model's notation, bracketed."""
    return f"[{answer(*operands(prompt))}]"


def write_splits(directory: str | Path, train: int, eval: int, seed: int, digits: int) -> None:
    for split, n in (("train", train), ("eval", eval)):
        problems = addition.make_problems(n, seed, digits, split)
        addition.write_jsonl(Path(directory) / f"{split}.jsonl", problems)


def teacher(
    prompt: str, rng: random.Random, call_rate: float, carry_drop: float
) -> list[tuple[str, bool]]:
    """One demonstration as ``(text, trained)`` turns: a call, the tool's reply and the copied
    answer; or a direct answer with carries sometimes forgotten. ``<eos>`` ends the answer."""
    if rng.random() < call_rate:
        result = calculator(prompt)
        return [(CALL, True), (result, False), (result[1:-1] + EOS, True)]
    return [(answer(*operands(prompt), carry_drop, rng) + EOS, True)]


def warm_start(
    directory: str | Path,
    steps: int = 400,
    seed: int = 0,
    digits: int = 2,
    call_rate: float = 0.2,
    carry_drop: float = 0.6,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> Path:
    """Supervised imitation of the teacher (examples/addition's ``imitate``: ~30-45 s on 2 CPU
    cores); saves model and tokenizer to ``directory``, skipped when cached."""
    directory = Path(directory)
    parameters = dict(
        steps=steps,
        seed=seed,
        digits=digits,
        call_rate=call_rate,
        carry_drop=carry_drop,
        batch_size=batch_size,
        lr=lr,
        model=addition.MODEL_CONFIG,
        format="calculator-v2",
    )

    def demonstrate(prompt: str, rng: random.Random) -> list[tuple[str, bool]]:
        return teacher(prompt, rng, call_rate, carry_drop)

    return addition.imitate(directory, parameters, build_tokenizer(directory), demonstrate)
