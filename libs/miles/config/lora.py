"""``trainer.lora``: low-rank adapters on the torch backend (Hu et al. 2021, arXiv:2106.09685).

Each targeted linear layer ``W`` becomes ``W + (alpha / rank) * B @ A`` with ``A`` of shape
``[rank, in]`` and ``B`` of shape ``[out, rank]`` (B starts at zero, so step 0 is the base
model); only ``A`` and ``B`` train, and AdamW keeps moments for them alone.

There is no dropout field, unlike peft's ``LoraConfig``: the trainer runs its policy in eval mode
so that pi_theta in the ratio pi_theta / pi_old is the deterministic function the engine sampled
from (dropout would make the ratio of an on-policy sample differ from 1 by noise, and the loss
of a replayed step depend on the RNG). LoRA dropout would be switched off by that eval mode too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from miles.config.section import Section


class LoraConfig(Section):
    rank: int = Field(
        0,
        ge=0,
        description="The adapters' rank r; 0: LoRA off, every weight trains (full fine-tuning).",
    )
    alpha: int = Field(
        16, ge=1, description="The update is scaled by alpha / rank (peft's lora_alpha)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        min_length=1,
        description="The linear layers that get adapters: module names or suffixes "
        "(['q_proj', 'v_proj']), or 'all-linear': every linear layer but the output head. "
        "Adapters on the MLPs as well as attention matter for RL (Schulman et al. 2025, "
        "'LoRA Without Regret').",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0
