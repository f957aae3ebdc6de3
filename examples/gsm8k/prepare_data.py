"""GSM8K's JSONL ({"question", "answer": "... #### 72"}) -> miles' {"prompt", "label"} JSONL.

    python examples/gsm8k/prepare_data.py /data/gsm8k/train.jsonl /data/gsm8k/miles-train.jsonl \\
        --model /models/Qwen2.5-1.5B-Instruct

Offline: the tokenizer (for its chat template) is read from the local model directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

INSTRUCTION = "Solve the problem step by step, then give the final answer as \\boxed{number}."


def convert(source: Path, target: Path, model: Path) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    rows = 0
    with source.open() as reader, target.open("w") as writer:
        for line in reader:
            if not line.strip():
                continue
            item = json.loads(line)
            label = item["answer"].split("####")[-1].strip().replace(",", "")
            messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{item['question']}"}]
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            writer.write(json.dumps({"prompt": prompt, "label": label}) + "\n")
            rows += 1
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--model", type=Path, required=True, help="local HF model directory")
    args = parser.parse_args()
    print(f"wrote {convert(args.source, args.target, args.model)} rows to {args.target}")
