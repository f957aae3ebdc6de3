"""A tiny random Llama and a char-level arithmetic tokenizer, built offline into a directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# <eos> is id 0 so that a model whose logits are all equal picks it greedily (argmax ties go to
# the first index): that is how the tests force an end-of-sequence.
VOCAB = ["<eos>", "<pad>", *"0123456789", "+", "=", " ", *"abcdefghijklmnop"]

BuildTinyModel = Callable[..., Path]


def build_tiny_model(directory: Path, tie_word_embeddings: bool = True, seed: int = 0) -> Path:
    word_level = models.WordLevel(
        {token: index for index, token in enumerate(VOCAB)}, unk_token="<pad>"
    )
    tokenizer = Tokenizer(word_level)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Larger than the default 0.02 so the next-token distributions are far from uniform.
        initializer_range=0.3,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def build_model() -> BuildTinyModel:
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
