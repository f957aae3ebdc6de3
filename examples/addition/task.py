"""The addition task: problems, a character tokenizer, a tiny Llama, a warm start and the reward.

The model reads ``"57+68="`` and writes the sum **least-significant digit first**, then
``<eos>``: 57+68 = 125 is answered ``"521"``. Written that way each answer digit depends only on
the operand digits at that place and the carry from the digit just written, so a 0.6M-parameter
model learns it in a minute on a CPU (Lee et al. 2023, "Teaching Arithmetic to Small
Transformers", arXiv:2307.03381, reversed output). ``label`` is the exact completion (``"521"``).

Operands are uniform in ``[0, 10**digits)``, written without leading zeros. Which split a pair
``(a, b)`` belongs to is a fixed function of the pair (CRC32 of ``"a+b"``), so train and
held-out sets are disjoint whatever the seeds and sizes.

The warm start imitates a *sloppy teacher* that forgets each carry with probability
``carry_drop`` (0.6), so the model learns to carry but, greedily, mostly does not: it is right
on about a third of held-out problems (those without a carry). GRPO with the exact-match reward
then reinforces one behaviour shared by every problem with a carry, which 8 groups x 8 samples
per step can follow: RL beats imitation of imperfect demonstrations. A warm start merely
*stopped early* on correct labels was measured too and does not work at this budget: its errors
are scattered, and 40 GRPO steps left held-out accuracy flat or lower at every learning rate
tried (as do supervised AdamW steps on 8 examples at a time).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
CHARACTERS = "0123456789+="
EVAL_SHARE = 10  # one pair in EVAL_SHARE is held out

MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
    # ~1/sqrt(hidden). HF's default 0.02 left the warm start on a loss plateau about twice as long.
    initializer_range=0.08,
)


CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A minimal chat format: ``<|user|>57+68=<|end|><|assistant|>`` asks for the answer."""


def build_tokenizer(
    directory: str | Path, chat: bool = False, extra: str = ""
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer saved to ``directory`` (loadable offline by AutoTokenizer).

    No post-processor: encoding a prompt adds neither a BOS nor an EOS token. With ``chat``,
    the role markers are special tokens and ``CHAT_TEMPLATE`` is its chat template; ``extra``
    characters join the vocabulary (examples/calculator's tool call).
    """
    vocab = {token: index for index, token in enumerate([PAD, EOS, *CHARACTERS, *extra])}
    backend = Tokenizer(models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without the default spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, padding_side="left"
    )
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def as_chat(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    """``prompt`` as the user's turn, rendered with the chat template, ready for the answer."""
    messages = [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised ~0.66M-parameter Llama (tied embeddings) for ``tokenizer``."""
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
    """The completion for ``a+b=``: the sum's digits, least significant first.

    With ``carry_drop > 0`` each carry is forgotten with that probability (the sloppy teacher).
    """
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


def is_held_out(a: int, b: int) -> bool:
    return zlib.crc32(f"{a}+{b}".encode()) % EVAL_SHARE == 0


def make_problems(n: int, seed: int, digits: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct problems ``{"prompt": "57+68=", "label": "521"}`` from ``split``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng = random.Random(f"{seed}-{split}")
    seen: set[tuple[int, int]] = set()
    problems: list[dict[str, str]] = []
    for _ in range(20 * n + 1000):  # rejection sampling; enough draws unless the split runs out
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


def preference_pairs(problems: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """DPO's data: each problem with the right answer chosen and the sloppy teacher's rejected,
    the answer with every carry forgotten; where there is no carry to forget, the answer with
    one digit changed."""
    rng = random.Random(f"{seed}-pairs")
    pairs = []
    for problem in problems:
        a, b = (int(x) for x in problem["prompt"].rstrip("=").split("+"))
        rejected = answer(a, b, carry_drop=1.0, rng=rng)
        if rejected == problem["label"]:
            digits = list(rejected)
            place = rng.randrange(len(digits))
            digits[place] = str((int(digits[place]) + rng.randrange(1, 10)) % 10)
            rejected = "".join(digits)
        pairs.append(
            {"prompt": problem["prompt"], "chosen": problem["label"], "rejected": rejected}
        )
    return pairs


def write_splits(directory: str | Path, train: int, eval: int, seed: int, digits: int) -> None:
    """``train.jsonl``, its preference pairs ``train_pairs.jsonl`` (DPO) and ``eval.jsonl``."""
    problems = make_problems(train, seed, digits, "train")
    write_jsonl(Path(directory) / "train.jsonl", problems)
    write_jsonl(Path(directory) / "train_pairs.jsonl", preference_pairs(problems, seed))
    write_jsonl(Path(directory) / "eval.jsonl", make_problems(eval, seed, digits, "eval"))


def reward(completion: str, label: str) -> float:
    """1.0 for exactly the answer, else 0.0. Text from an ``<eos>`` on is ignored.

    Partial credit per correct digit was measured and did not help GRPO here, so there is none.
    """
    return 1.0 if completion.split(EOS)[0].strip() == label else 0.0


Turns = list[tuple[str, bool]]
"""A demonstration after its prompt: ``(text, trained)`` turns, ``<eos>`` written out where the
answer ends; untrained turns (a tool's reply) are context with no loss."""


def supervised_batch(
    tokenizer: PreTrainedTokenizerFast, rows: list[tuple[str, Turns]]
) -> dict[str, torch.Tensor]:
    """Right-padded (prompt, turns) demonstrations; the loss on the trained turns only."""
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


Demonstrate = Callable[[str, random.Random], Turns]
"""A teacher: the turns that answer a prompt, drawing any randomness from the generator."""


def imitate(
    directory: Path,
    parameters: dict[str, Any],
    tokenizer: PreTrainedTokenizerFast,
    demonstrate: Demonstrate,
    render: Callable[[str], str] = str,
) -> Path:
    """Train a fresh model to imitate ``demonstrate`` on rendered training prompts; save it and
    ``tokenizer`` to ``directory``, with ``DONE`` holding the digest of ``parameters`` (which
    must name everything that changes the result: a later call with the same digest is free).

    AdamW with a warmup-stable-decay schedule (50 warmup and 50 cooldown steps): the cooldown
    settles the model, so its greedy accuracy does not depend on where a noisy step stopped.
    """
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
    done = directory / "DONE"
    if done.is_file() and done.read_text().strip() == digest:
        return directory
    steps, seed, batch_size = parameters["steps"], parameters["seed"], parameters["batch_size"]
    model = make_model(tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=parameters["lr"], weight_decay=0.0)
    ramp = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / ramp, (steps - step) / ramp)
    )
    digits = parameters["digits"]
    pool_size = min(steps * batch_size // 4 + batch_size, 10 ** (2 * digits) // 2)
    problems = make_problems(pool_size, seed, digits)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        rows = [
            (render(problem["prompt"]), demonstrate(problem["prompt"], rng))
            for problem in rng.sample(problems, batch_size)
        ]
        loss = model(**supervised_batch(tokenizer, rows)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(str(directory))  # safetensors
    (directory / "warm_start.json").write_text(json.dumps({**parameters, "loss": loss.item()}))
    done.write_text(digest + "\n")
    return directory


def operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def warm_start(
    directory: str | Path,
    steps: int = 400,
    seed: int = 0,
    digits: int = 2,
    carry_drop: float = 0.6,
    batch_size: int = 64,
    lr: float = 1e-3,
    chat: bool = False,
) -> Path:
    """Supervised imitation of the sloppy teacher; saves model and tokenizer to ``directory``.

    The defaults (2 digits, 400 steps) take ~30-45 s on 2 CPU cores and give ~32% greedy accuracy.
    Skipped when ``directory/DONE`` records the same parameters (``imitate``). With ``chat``,
    the tokenizer has a chat template and the model learns to answer prompts rendered with it.
    """
    directory = Path(directory)
    parameters = dict(
        steps=steps,
        seed=seed,
        digits=digits,
        carry_drop=carry_drop,
        batch_size=batch_size,
        lr=lr,
        model=MODEL_CONFIG,
        format="reversed-v2",
    )
    if chat:
        parameters["chat_template"] = CHAT_TEMPLATE
    tokenizer = build_tokenizer(directory, chat)

    def sloppy(prompt: str, rng: random.Random) -> Turns:
        return [(answer(*operands(prompt), carry_drop, rng) + EOS, True)]

    render = functools.partial(as_chat, tokenizer) if chat else str
    return imitate(directory, parameters, tokenizer, sloppy, render)


@torch.no_grad()
def complete(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    max_new_tokens: int = 6,
    **sampling: float | bool,
) -> list[str]:
    """Completions (text before ``<eos>``) for ``prompts``; greedy unless ``do_sample=True``."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"do_sample": False, **sampling},
    )
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :])
    return [text.split(EOS)[0] for text in texts]


def greedy_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[dict[str, str]],
    batch_size: int = 200,
) -> float:
    """Share of ``problems`` whose greedy completion earns reward 1."""
    correct = 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        texts = complete(model, tokenizer, [problem["prompt"] for problem in chunk])
        labels = [problem["label"] for problem in chunk]
        correct += sum(reward(text, label) for text, label in zip(texts, labels, strict=True))
    return correct / len(problems)
