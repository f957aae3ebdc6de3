"""PPO's value model: the policy's architecture with a scalar head, its own AdamW.

``values`` at position t estimates the return from the state ``input_ids[:t + 1]``, the state
in which response token t + 1 is chosen, so it lines up with ``loss_mask`` and the logprobs.
The critic's weights and optimizer moments travel in the trainer's state file
(``TorchTrainer.save_state``), which the step's manifest names and checks, so a killed trainer
resumes its critic with the policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForTokenClassification

from miles.algo.advantages import gae
from miles.algo.value import clipped_value_loss, masked_whiten, outcome_rewards
from miles.config import PPO, TrainerConfig
from miles.trainer.batch import TensorBatch, per_position, split


class Critic:
    def __init__(
        self, model_path: str, algorithm: PPO, trainer: TrainerConfig, device: torch.device
    ) -> None:
        self.algorithm = algorithm
        self.trainer = trainer
        # The head is new (initialised from the seeded generator); the body is the policy's.
        self.model = AutoModelForTokenClassification.from_pretrained(
            algorithm.critic_path or model_path, num_labels=1, dtype=torch.float32
        )
        self.model.to(device)  # type: ignore[arg-type]
        self.model.eval()  # no dropout, as the policy
        self.lr = trainer.lr if algorithm.critic_lr is None else algorithm.critic_lr
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.lr,
            betas=trainer.betas,
            weight_decay=trainer.weight_decay,
        )

    def scale_learning_rate(self, factor: float) -> None:
        """The policy's schedule applies to the critic's own base rate."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    def values(self, batch: TensorBatch) -> Tensor:
        """``[N, T - 1]``: V(input_ids[:, :t + 1]) at position t."""
        output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        values: Tensor = output.logits[:, :-1, 0].float()
        return values

    def with_targets(self, batch: TensorBatch) -> TensorBatch:
        """``batch`` with per-token GAE advantages (whitened over the batch), the old values
        and the returns: the outcome reward sits on each response's last token, and the KL
        penalty on every token when the KL is in the reward (``batch.token_rewards``)."""
        assert batch.rewards is not None, "collate puts each sample's reward in the batch"
        mask = batch.loss_mask
        old = per_position(batch, self.trainer.micro_batch_size, self.values)
        with torch.no_grad():
            rewards = batch.token_rewards
            if rewards is None:  # the KL, if any, is a loss term
                rewards = outcome_rewards(batch.rewards, mask)
            advantages, returns = gae(rewards, old, mask, self.algorithm.gamma, self.algorithm.lam)
            advantages = masked_whiten(advantages, mask) * mask
        return dataclasses.replace(batch, advantages=advantages, old_values=old, returns=returns)

    def step(self, part: TensorBatch) -> dict[str, float]:
        """One optimizer step of the clipped value loss on ``part`` (token-mean over it)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, clipped = 0.0, 0.0
        for micro in split(part, self.trainer.micro_batch_size):
            assert micro.old_values is not None and micro.returns is not None
            share = micro.num_tokens / part.num_tokens
            loss, fraction = clipped_value_loss(
                self.values(micro),
                micro.old_values,
                micro.returns,
                micro.loss_mask,
                self.algorithm.value_clip,
            )
            (loss * share).backward()
            loss_total += loss.item() * share
            clipped += fraction * share
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.trainer.grad_clip)
        self.optimizer.step()
        return {
            "value_loss": loss_total,
            "value_clip_frac": clipped,
            "value_grad_norm": grad_norm.item(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"critic": self.model.state_dict(), "critic_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["critic_optimizer"])
