"""LoRA vs full fine-tuning on the torch backend: what trains, what the optimizer and the
reference hold, and seconds per step, on this CPU.

Two models, random init from a config (no download): the addition demo's tiny Llama (~0.6M
parameters, tied embeddings) and a Llama with hidden size 512, 8 layers, a 32k vocabulary
(~42M). For each, ``TorchTrainer`` with GRPO and a KL term (so a reference policy exists) runs
``--steps`` built-in steps on a fixed batch after one warm-up step, for each variant:

- full:          every parameter trains; AdamW holds two moments per parameter, and the KL's
                 reference is a frozen copy of the model
- lora r8:       rank-8 adapters on every linear layer (``trainer.lora`` defaults)
- lora r8 attn:  rank 8 on q/k/v/o only
- lora r64:      rank 64 on every linear layer

Columns: trainable parameters (and their share of the base model's); optimizer state bytes
(the AdamW moments after a step); the reference's bytes (LoRA's reference is the base with its
adapters off: none); median seconds per step (forward, backward and the optimizer) and per
optimizer step alone; and the seconds ``save_weights`` takes (with LoRA it sums the merged
weights). Baseline: full fine-tuning of the same model, in the same process; ratios are against
it. Prints a table and writes benchmarks/results/bench_lora.json. Nothing is asserted:
tests/unit/trainer/test_lora.py holds the behaviour.

    python benchmarks/bench_lora.py
    python benchmarks/bench_lora.py --steps 3 --models addition
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from miles.config import GRPO, TrainerConfig
from miles.events import TrainSample
from miles.trainer import TorchTrainer

ROOT = Path(__file__).parents[1]

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"rank": 0},
    "lora r8": {"rank": 8},
    "lora r8 attn": {"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "lora r64": {"rank": 64, "alpha": 128},
}
ALGORITHM = GRPO(kl_coef=0.05, old_logprobs="engine", aggregation="token_mean")


def addition_model(directory: Path) -> tuple[int, int, int]:
    """The demo's model; returns (vocab, prompt tokens, response tokens) of its batches."""
    sys.path.insert(0, str(ROOT / "examples" / "addition"))
    import task  # type: ignore[import-not-found]  # the demo's offline tokenizer and model

    tokenizer = task.build_tokenizer(directory)
    task.make_model(tokenizer, seed=0).save_pretrained(str(directory))
    return len(tokenizer), 6, 4


def llama_512(directory: Path) -> tuple[int, int, int]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return config.vocab_size, 64, 64


MODELS = {"addition": (addition_model, 64), "llama-512x8": (llama_512, 16)}
"""name -> (builder, samples per batch): the demo's 8 groups of 8; 16 longer samples."""


def batch(vocab: int, count: int, prompt: int, response: int) -> list[TrainSample]:
    rng = random.Random(0)
    return [
        TrainSample(
            sample_id=f"s{index}",
            prompt_ids=[rng.randrange(2, vocab) for _ in range(prompt)],
            response_ids=[rng.randrange(1, vocab) for _ in range(response)],
            response_logprobs=[rng.uniform(-3.0, -0.5) for _ in range(response)],
            advantage=rng.uniform(-1.0, 1.0),
            reward=0.0,
            policy_version=0,
        )
        for index in range(count)
    ]


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model_dir: Path, samples: list[TrainSample], lora: dict, steps: int) -> dict:
    config = TrainerConfig(threads=2, micro_batch_size=16, lr=1e-3, lora=lora)
    trainer = TorchTrainer(str(model_dir), config, ALGORITHM, seed=0)
    trainer.train_step(samples)  # warm-up: the moments exist from here
    step_seconds, optimizer_seconds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        metrics = trainer.train_step(samples)
        step_seconds.append(time.perf_counter() - started)
        assert metrics.seconds_optimizer is not None
        optimizer_seconds.append(metrics.seconds_optimizer)
    moments = [
        value
        for state in trainer.optimizer.state.values()
        for value in state.values()
        if value.dim() > 0  # AdamW's step counter is a 0-d tensor
    ]
    reference = 0
    if trainer.lora is None and trainer.reference is not None:
        reference = tensor_bytes(trainer.reference.parameters())
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        trainer.save_weights(out)
        save_seconds = time.perf_counter() - started
    return {
        "base_parameters": sum(
            p.numel() for name, p in trainer.model.named_parameters() if "lora_" not in name
        ),
        "trainable": sum(p.numel() for p in trainer.trainable),
        "optimizer_bytes": tensor_bytes(moments),
        "reference_bytes": reference,
        "seconds_per_step": statistics.median(step_seconds),
        "seconds_optimizer": statistics.median(optimizer_seconds),
        "seconds_save_weights": save_seconds,
    }


def mib(count: int) -> str:
    return f"{count / 2**20:.2f}"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=5, help="Measured steps per variant.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_lora.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="miles-bench-lora-") as tmp:
        for model in args.models:
            build, count = MODELS[model]
            directory = Path(tmp) / model
            vocab, prompt, response = build(directory)
            samples = batch(vocab, count, prompt, response)
            for variant, lora in VARIANTS.items():
                row = {"model": model, "variant": variant, "samples": count}
                rows.append(row | measure(directory, samples, lora, args.steps))
                print(f"  {model} {variant}: {rows[-1]['seconds_per_step']:.3f} s/step", flush=True)

    header = (
        "| model | variant | trainable | trainable share | optimizer MiB | opt / full "
        "| reference MiB | s/step | s/step / full | optimizer s | save_weights s |"
    )
    print(f"\n{header}\n|{'---|' * 11}")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["variant"] == "full")
        print(
            f"| {row['model']} | {row['variant']} | {row['trainable']:,} | "
            f"{row['trainable'] / row['base_parameters']:.2%} | {mib(row['optimizer_bytes'])} | "
            f"{ratio(row['optimizer_bytes'], base['optimizer_bytes'])} | "
            f"{mib(row['reference_bytes'])} | {row['seconds_per_step']:.3f} | "
            f"{ratio(row['seconds_per_step'], base['seconds_per_step'])} | "
            f"{row['seconds_optimizer']:.4f} | {row['seconds_save_weights']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
