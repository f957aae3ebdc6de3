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

Operands are uniform in ``[0, 10**digits)``; which split a pair belongs to is a fixed function
of the pair (CRC32 of ``"a+b"``), so train and held-out sets are disjoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
CALL = "?"
"""The model's tool call: the first turn stops on it (``stop_token_ids``)."""
CHARACTERS = "0123456789+=" + CALL + "[]"
EVAL_SHARE = 10  # one pair in EVAL_SHARE is held out

MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
    initializer_range=0.08,  # as examples/addition: ~1/sqrt(hidden)
)


def build_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer saved to ``directory``; encoding adds no special token."""
    vocab = {token: index for index, token in enumerate([PAD, EOS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, padding_side="left"
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **MODEL_CONFIG,
    )
    return LlamaForCausalLM(config)


def answer(a: int, b: int, carry_drop: float = 0.0, rng: random.Random | None = None) -> str:
    """The sum's digits, least significant first; each carry forgotten with ``carry_drop``."""
    digits: list[str] = []
    carry = 0
    while a or b or carry or not digits:
        place = a % 10 + b % 10 + carry
        digits.append(str(place % 10))
        carry = place // 10
        if carry and carry_drop and rng is not None and rng.random() < carry_drop:
            carry = 0
        a, b = a // 10, b // 10
    return "".join(digits)


def operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def calculator(prompt: str) -> str:
    """The tool: the exact sum of ``"a+b="``, in the model's notation, bracketed."""
    return f"[{answer(*operands(prompt))}]"


def is_held_out(a: int, b: int) -> bool:
    return zlib.crc32(f"{a}+{b}".encode()) % EVAL_SHARE == 0


def make_problems(n: int, seed: int, digits: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct problems ``{"prompt": "57+68=", "label": "521"}`` from ``split``."""
    rng = random.Random(f"calculator-{seed}-{split}")
    seen: set[tuple[int, int]] = set()
    problems: list[dict[str, str]] = []
    for _ in range(20 * n + 1000):
        if len(problems) == n:
            break
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        if (a, b) in seen or is_held_out(a, b) != (split == "eval"):
            continue
        seen.add((a, b))
        problems.append({"prompt": f"{a}+{b}=", "label": answer(a, b)})
    if len(problems) < n:
        raise ValueError(f"cannot draw {n} distinct {split} problems of {digits} digits")
    return problems


def write_jsonl(path: str | Path, problems: Iterable[dict[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(problem) + "\n" for problem in problems))
    return path


def write_splits(directory: str | Path, train: int, eval: int, seed: int, digits: int) -> None:
    write_jsonl(Path(directory) / "train.jsonl", make_problems(train, seed, digits, "train"))
    write_jsonl(Path(directory) / "eval.jsonl", make_problems(eval, seed, digits, "eval"))


def reward(final_answer: str, label: str) -> float:
    """1.0 for exactly the answer (text from an ``<eos>`` on ignored), else 0.0."""
    return 1.0 if final_answer.split(EOS)[0].strip() == label else 0.0


def teacher(
    prompt: str, rng: random.Random, call_rate: float, carry_drop: float
) -> list[tuple[str, bool]]:
    """One demonstration as ``(text, trained)`` turns: a call, the tool's reply and the copied
    answer; or a direct answer with carries sometimes forgotten. ``<eos>`` ends the answer."""
    if rng.random() < call_rate:
        result = calculator(prompt)
        return [(CALL, True), (result, False), (result[1:-1] + EOS, True)]
    return [(answer(*operands(prompt), carry_drop, rng) + EOS, True)]


def supervised_batch(
    tokenizer: PreTrainedTokenizerFast, rows: list[tuple[str, list[tuple[str, bool]]]]
) -> dict[str, torch.Tensor]:
    """Right-padded demonstrations; the loss on the model's turns only (the tool's: -100)."""
    encoded = []
    for prompt, turns in rows:
        ids = tokenizer.encode(prompt)
        labels = [-100] * len(ids)
        for text, trained in turns:
            turn = tokenizer.encode(text)
            ids += turn
            labels += turn if trained else [-100] * len(turn)
        encoded.append((ids, labels))
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in encoded]),
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded]),
    }


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
    """Supervised imitation of the teacher; saves model and tokenizer to ``directory``.

    As examples/addition's warm start (AdamW, 50 warmup and 50 cooldown steps, ~30-45 s on 2
    CPU cores); skipped when ``directory/DONE`` records the same parameters.
    """
    directory = Path(directory)
    parameters = dict(
        steps=steps,
        seed=seed,
        digits=digits,
        call_rate=call_rate,
        carry_drop=carry_drop,
        batch_size=batch_size,
        lr=lr,
        model=MODEL_CONFIG,
        format="calculator-v1",
    )
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
    done = directory / "DONE"
    if done.is_file() and done.read_text().strip() == digest:
        return directory

    tokenizer = build_tokenizer(directory)
    model = make_model(tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ramp = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / ramp, (steps - step) / ramp)
    )
    pool_size = min(steps * batch_size // 4 + batch_size, 10 ** (2 * digits) // 2)
    problems = make_problems(pool_size, seed, digits)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        rows = [
            (problem["prompt"], teacher(problem["prompt"], rng, call_rate, carry_drop))
            for problem in rng.sample(problems, batch_size)
        ]
        loss = model(**supervised_batch(tokenizer, rows)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(str(directory))
    (directory / "warm_start.json").write_text(json.dumps({**parameters, "loss": loss.item()}))
    done.write_text(digest + "\n")
    return directory
