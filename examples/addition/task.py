"""The addition task: problems, a character tokenizer, a tiny Llama, a warm start and the reward.

The model reads ``"123+45="`` and writes the sum **least-significant digit first**, then
``<eos>``: 123+45 = 168 is answered ``"861"``. Written that way each answer digit depends only on
the two operand digits at that place and the carry from the digit just written, so a 0.6M
parameter model learns it in minutes on a CPU; written most-significant first, the first digit
already needs every carry (Lee et al. 2023, "Teaching Arithmetic to Small Transformers",
arXiv:2307.03381, section 4). ``label`` is the completion the model must write (``"861"``).

Operands are uniform in ``[0, 10**digits)`` and written without leading zeros. Which split a
pair ``(a, b)`` belongs to is a fixed function of the pair (a CRC32 of ``"a+b"``), so the train
and held-out sets are disjoint whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
CHARACTERS = "0123456789+="
EVAL_SHARE = 10  # one pair in EVAL_SHARE is held out

# Sizes chosen so a warm start of a few hundred steps takes well under a minute on 2 CPU cores.
MODEL_SIZES = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=32,
)


def build_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A character-level tokenizer saved to ``directory`` (loadable offline by AutoTokenizer).

    No post-processor: encoding a prompt adds neither a BOS nor an EOS token.
    """
    vocab = {token: index for index, token in enumerate([PAD, EOS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without the default spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, padding_side="left"
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised ~0.6M-parameter Llama (tied embeddings) for ``tokenizer``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **MODEL_SIZES,
    )
    return LlamaForCausalLM(config)


def answer(a: int, b: int) -> str:
    """The completion for ``a+b=``: the digits of the sum, least significant first."""
    return str(a + b)[::-1]


def is_held_out(a: int, b: int) -> bool:
    return zlib.crc32(f"{a}+{b}".encode()) % EVAL_SHARE == 0


def make_problems(n: int, seed: int, digits: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct problems ``{"prompt": "123+45=", "label": "861"}`` from ``split``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    pool = 10 ** (2 * digits) // EVAL_SHARE * (1 if split == "eval" else EVAL_SHARE - 1)
    if n > pool * 0.8:  # the hash split is only approximately 1 in EVAL_SHARE
        raise ValueError(f"{n} {split} problems with {digits} digits: ask for at most {pool * 0.8:.0f}")
    rng = random.Random(f"{seed}-{split}")
    seen: set[tuple[int, int]] = set()
    problems = []
    while len(problems) < n:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        if (a, b) in seen or is_held_out(a, b) != (split == "eval"):
            continue
        seen.add((a, b))
        problems.append({"prompt": f"{a}+{b}=", "label": answer(a, b)})
    return problems


def write_jsonl(path: str | Path, problems: Iterable[dict[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(problem) + "\n" for problem in problems))
    return path


def write_splits(directory: str | Path, train: int, eval: int, seed: int, digits: int) -> None:
    """``train.jsonl`` and ``eval.jsonl`` in ``directory``."""
    write_jsonl(Path(directory) / "train.jsonl", make_problems(train, seed, digits, "train"))
    write_jsonl(Path(directory) / "eval.jsonl", make_problems(eval, seed, digits, "eval"))


def reward(completion: str, label: str) -> float:
    """1.0 for exactly the answer, else 0.0. Text from an ``<eos>`` on is ignored."""
    return 1.0 if completion.split(EOS)[0].strip() == label else 0.0


def supervised_batch(
    tokenizer: PreTrainedTokenizerFast, problems: list[dict[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded inputs whose labels are the answer tokens and ``<eos>`` (prompt masked)."""
    rows = []
    for problem in problems:
        prompt = tokenizer.encode(problem["prompt"])
        target = tokenizer.encode(problem["label"]) + [tokenizer.eos_token_id]
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    pad = width - torch.tensor([len(ids) for ids, _ in rows])
    return {
        "input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        "attention_mask": (torch.arange(width)[None, :] < (width - pad)[:, None]).long(),
    }


def warm_start(
    directory: str | Path,
    steps: int = 300,
    seed: int = 0,
    digits: int = 3,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> Path:
    """Supervised training stopped early, so RL starts from a model that is sometimes right.

    Saves model and tokenizer to ``directory``; skipped when ``directory/DONE`` records the
    same parameters.
    """
    directory = Path(directory)
    parameters = dict(steps=steps, seed=seed, digits=digits, batch_size=batch_size, lr=lr,
                      model=MODEL_SIZES, characters=CHARACTERS, format="reversed-v1")
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
    done = directory / "DONE"
    if done.is_file() and done.read_text().strip() == digest:
        return directory

    started = time.perf_counter()
    tokenizer = build_tokenizer(directory)
    model = make_model(tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    problems = make_problems(min(steps * batch_size // 4, 10 ** (2 * digits) // 2), seed, digits)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss = model(**supervised_batch(tokenizer, rng.sample(problems, batch_size))).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    model.save_pretrained(str(directory))  # safetensors
    (directory / "warm_start.json").write_text(
        json.dumps({**parameters, "final_loss": loss.item(),
                    "seconds": time.perf_counter() - started}, indent=2)
    )
    done.write_text(digest + "\n")
    return directory


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
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    return [text.split(EOS)[0].replace(PAD, "") for text in texts]


def greedy_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[dict[str, str]],
    batch_size: int = 200,
) -> float:
    """Share of ``problems`` whose greedy completion earns reward 1."""
    correct = 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        texts = complete(model, tokenizer, [p["prompt"] for p in chunk])
        correct += sum(reward(text, p["label"]) for text, p in zip(texts, chunk))
    return correct / len(problems)
