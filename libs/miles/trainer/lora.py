"""LoRA on the torch backend: peft's adapters on the HF model, and the weights engines get.

Only the adapters train (``trainer.lora``, Hu et al. 2021, arXiv:2106.09685); the base weights
stay those of ``model.path``. The engines serve a plain HF model, so every weight-sync path (the
blob store's directory, the ``distributed`` and ``tensor`` pushes) carries the merged weights
``W + (alpha / rank) * B @ A`` under the base model's HF names. They are summed out of place from
peft's own ``get_delta_weight``, the sum ``merge_and_unload`` makes (so its tensors, bit for bit),
while the live model keeps ``W`` and the adapters apart: merging in place and back
(``merge_adapter`` / ``unmerge_adapter``) would leave ``W + d - d``, which is not ``W`` in floats.
No engine here takes an adapter of its own (the transformers engine and the SGLang stand-in load
full weights; SGLang's ``load_lora_adapter`` reads a directory of its own, which the flat blob
store cannot hold beside the merged weights), so merged weights are what every path publishes.

The adapter cannot be recovered from merged weights, so the weights directory carries it as
well, in ``ADAPTER_FILE`` (safetensors, peft's names), under a name no HF loader globs
(``*.safetensors``, ``*.bin``, ``*.pt``): SGLang and vLLM load the merged weights alone. The
weights' metadata (``miles.shards.weights_metadata``: the single file's header, or the shards'
index) holds the adapter file's sha256, so the weights' digest in the manifest covers both, and
a resume (``load_weights``) restores the policy exactly, whatever ``trainer.checkpoint_every``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import peft
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from miles import shards
from miles.config import LoraConfig
from miles.trainer.hf_weights import save_hf_weights

ADAPTER_FILE = "adapter.lora"
ADAPTER_SHA256 = "miles_lora_adapter_sha256"
"""The key of the weights' metadata that names ``ADAPTER_FILE``'s sha256."""
ADAPTER = "default"
"""peft's name for the one adapter."""


def with_adapters(model: PreTrainedModel, config: LoraConfig) -> peft.PeftModel:
    """``model`` with LoRA layers put into it in place (its forward now runs them) and every
    base parameter frozen; returns peft's wrapper, for what only peft knows (switching the
    adapters off, their state dict)."""
    lora = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=config.target_modules,
        lora_dropout=0.0,  # see miles.config.lora: the policy runs in eval mode
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = peft.get_peft_model(model, lora)
    wrapped.eval()  # get_peft_model leaves the wrapper in train mode
    return wrapped


class BaseModel(nn.Module):
    """The base model: the policy with its adapters switched off, the reference pi_ref of the KL
    term and of DPO. peft's switched-off LoRA layer calls its base layer alone, so this is
    exactly the frozen copy a full fine-tune keeps, with no second copy of the weights."""

    def __init__(self, policy: peft.PeftModel) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, **inputs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(**inputs)


def merged_tensors(policy: peft.PeftModel) -> dict[str, Tensor]:
    """The weights a plain HF model of the policy holds, under its HF names (no
    ``base_model.model.`` or ``base_layer``): each LoRA layer's weight merged, every other tensor
    the live one (not copied; a tied one under each of its names, as ``state_dict`` gives it)."""
    model = _hf_model(policy)
    tensors = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if ".lora_" not in name
    }
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                base = layer.get_base_layer().weight
                # Each LoRA layer type (Linear, Embedding, Conv) defines it; LoraLayer does not.
                delta = layer.get_delta_weight(ADAPTER)  # type: ignore[attr-defined]
                tensors[f"{name}.weight"] = base + delta
    return tensors


def save_weights(policy: peft.PeftModel, directory: str, max_shard_bytes: int) -> str:
    """``config.json``, the merged weights and ``ADAPTER_FILE`` into ``directory``; returns the
    weights' digest (``miles.shards``)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(peft.get_peft_model_state_dict(policy), path / ADAPTER_FILE)
    metadata = {ADAPTER_SHA256: shards.sha256_file(path / ADAPTER_FILE)}
    tensors = merged_tensors(policy)
    return save_hf_weights(_hf_model(policy), tensors, path, max_shard_bytes, metadata)


def load_weights(policy: peft.PeftModel, directory: str, device: torch.device) -> None:
    """The adapter ``save_weights`` wrote, copied into the live adapter parameters (so the
    optimizer's references hold); the base weights are ``model.path``'s and never change."""
    path = Path(directory)
    expected = shards.weights_metadata(path).get(ADAPTER_SHA256)
    if expected is None:
        raise ValueError(
            f"{path} holds no LoRA adapter: these weights were not saved with trainer.lora on, "
            "and a LoRA trainer cannot take full weights (their adapter is not recoverable)"
        )
    actual = shards.sha256_file(path / ADAPTER_FILE)
    if actual != expected:
        raise ValueError(f"{path / ADAPTER_FILE}: sha256 {actual}, the weights name {expected}")
    adapter = load_file(path / ADAPTER_FILE, device=str(device))
    names = peft.get_peft_model_state_dict(policy).keys()
    if adapter.keys() != names:
        raise ValueError(
            f"{path / ADAPTER_FILE} holds other adapters than trainer.lora puts on the model: "
            "was trainer.lora.target_modules changed?"
        )
    peft.set_peft_model_state_dict(policy, adapter)


def _hf_model(policy: peft.PeftModel) -> PreTrainedModel:
    """The HF model the adapters were put into (peft types it as a module or a tensor)."""
    return cast(PreTrainedModel, policy.get_base_model())
