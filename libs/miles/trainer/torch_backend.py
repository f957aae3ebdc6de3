"""The plain-PyTorch training backend: one process, one HF causal LM, AdamW, on CPU.

One ``train_step`` consumes one batch with the configured algorithm: ``ppo_epochs`` passes over
it, each split into ``mini_batches`` optimizer steps, in a fixed order (PPO, Schulman et al.
2017, arXiv:1707.06347, Algorithm 1: K epochs of minibatch SGD on the data of one iteration).
With one update the ratio starts at 1; with several, pi_old is the trainer's policy before the
first, computed in a forward pass over the batch up front.

Precision: weights, gradients and AdamW moments are always fp32. ``dtype="bf16"`` runs the
forward under CPU autocast to bf16 (matmuls in bf16, softmax and loss in fp32), which is the
honest CPU analogue of mixed-precision training with fp32 master weights; saved weights stay fp32.

With ``trainer.lora`` (``miles.trainer.lora``) only the adapters train and AdamW holds their
moments alone; the reference is the policy with its adapters switched off (no frozen copy), and
the weights published and saved are the merged ones. PPO's critic stays a full fine-tune.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from miles import shards
from miles.algo import (
    aggregate,
    kl_estimate,
    kl_penalized_rewards,
    reinforce_pp_returns,
    share,
)
from miles.algo.value import outcome_rewards
from miles.config import DPO, PPO, Algorithm, TrainerConfig
from miles.config.algorithm import PolicyGradient
from miles.events import TrainSample
from miles.trainer import lora
from miles.trainer.batch import (
    TensorBatch,
    collate,
    parts,
    per_position,
    split,
    token_logprobs,
    token_logprobs_and_entropy,
)
from miles.trainer.critic import Critic
from miles.trainer.fsdp.parallel import DataParallel
from miles.trainer.hf_weights import save_hf_weights
from miles.trainer.objective import (
    METRICS,
    MicroObjective,
    combine,
    measured,
    policy_objective,
    weighted_values,
)
from miles.trainer.preference import dpo_gradients
from miles.trainer.protocol import StepMetrics

UpdateFn = Callable[[nn.Module, TensorBatch, torch.optim.Optimizer], dict[str, float]]
"""A user's whole update: loss, backward and ``optimizer.step()``; returns its metrics."""

PAD_ID = 0
"""Any valid id works: right padding follows every real token, so causal attention never lets a
real position see it, and ``loss_mask`` drops the predictions made at padded positions."""

STATE_FILE = "trainer_state.pt"


class TorchTrainer:
    """The ``TrainerBackend`` of one process: the HF model (with LoRA adapters, or not), AdamW
    over what trains, a reference."""

    state_file = STATE_FILE

    def __init__(
        self,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        update_fn: UpdateFn | None = None,
        trust_remote_code: bool = False,
        parallel: DataParallel | None = None,
    ) -> None:
        """``parallel``: this process is one FSDP rank (``miles.trainer.fsdp``); None: alone."""
        if trainer.threads:  # 0: as resolved by MilesConfig.cpu_threads, else torch's own
            torch.set_num_threads(trainer.threads)
        torch.manual_seed(seed)
        self.trainer = trainer
        self.algorithm = algorithm
        self.update_fn = update_fn
        self.device = torch.device(trainer.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device)  # type: ignore[arg-type]  # transformers types .to oddly
        # The adapters go into self.model in place: its forward runs them, its base is frozen.
        self.lora = lora.with_adapters(self.model, trainer.lora) if trainer.lora.enabled else None
        # Eval mode switches dropout off: the ratio pi_theta / pi_old compares against an engine
        # that sampled without dropout. Gradients flow all the same.
        self.model.eval()
        self.reference: nn.Module | None = None
        if algorithm.needs_reference:
            self.reference = (
                _frozen_copy(self.model) if self.lora is None else lora.BaseModel(self.lora)
            )
        self.critic = (
            Critic(model_path, algorithm, trainer, self.device)
            if isinstance(algorithm, PPO)
            else None
        )
        self.parallel = parallel
        if parallel is not None:  # after the reference copy, which stays whole on each rank
            parallel.shard(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=trainer.lr,
            betas=trainer.betas,
            weight_decay=trainer.weight_decay,
        )

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        batch = collate(samples, PAD_ID).to(self.device)
        if self.update_fn is not None:
            return StepMetrics.from_mapping(self.update_fn(self.model, batch, self.optimizer))

        started = time.perf_counter()
        batch, reward_kl = self._with_targets(batch)
        steps: list[dict[str, float]] = []
        optimizer_seconds = 0.0
        for _ in range(self.algorithm.ppo_epochs):
            for part in parts(batch, self.algorithm.mini_batches):
                self.optimizer.zero_grad(set_to_none=True)
                metrics = self._gradients(part)
                step_started = time.perf_counter()
                grad_norm = nn.utils.clip_grad_norm_(self.trainable, self.trainer.grad_clip)
                self.optimizer.step()
                if self.critic is not None:
                    metrics |= self.critic.step(part)
                optimizer_seconds += time.perf_counter() - step_started
                steps.append({**metrics, "grad_norm": grad_norm.item()})
        # The first update's statistics describe the batch as sampled (ratio 1 on-policy, the
        # engine mismatch before any update); the loss and gradient norm are the means.
        first = steps[0]
        return StepMetrics.from_mapping(
            {
                **first,
                "loss": sum(s["loss"] for s in steps) / len(steps),
                "grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
                **reward_kl,
                "tokens": float(batch.num_tokens),
                "optimizer_steps": float(len(steps)),
                "seconds_forward_backward": time.perf_counter() - started - optimizer_seconds,
                "seconds_optimizer": optimizer_seconds,
            }
        )

    def scale_learning_rate(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.trainer.lr * factor
        if self.critic is not None:
            self.critic.scale_learning_rate(factor)

    def save_weights(self, directory: str) -> str:
        if self.lora is not None:
            return lora.save_weights(self.lora, directory, self.trainer.max_shard_bytes)
        tensors = self.model.state_dict()
        return save_hf_weights(self.model, tensors, directory, self.trainer.max_shard_bytes)

    def load_weights(self, directory: str) -> None:
        """Load policy weights in place; the optimizer moments and the reference are kept."""
        if self.lora is not None:
            lora.load_weights(self.lora, directory, self.device)
            return
        shards.load_module(self.model, directory, device=str(self.device))

    def named_tensors(self) -> dict[str, Tensor]:
        if self.lora is not None:
            return lora.merged_tensors(self.lora)
        return dict(self.model.state_dict())

    def save_state(self, directory: str) -> str:
        """Optimizer moments and the RNG, for a resume that continues bit for bit."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / STATE_FILE
        state = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.critic is not None:
            state |= self.critic.state_dict()
        torch.save(state, path)
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def load_state(self, directory: str) -> None:
        # weights_only: tensors and plain containers, nothing else is ever unpickled.
        state = torch.load(
            Path(directory) / STATE_FILE, map_location=self.device, weights_only=True
        )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            self.critic.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])

    def rng_state(self) -> str:
        return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def set_rng_state(self, encoded: str) -> None:
        raw = bytearray(base64.b64decode(encoded))
        torch.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

    def _with_targets(self, batch: TensorBatch) -> tuple[TensorBatch, dict[str, float]]:
        """What the updates need beyond the samples: pi_old when there are several, the
        KL-penalised per-token rewards, the critic's GAE targets or REINFORCE++'s per-token
        returns. Returns the KL metric when the KL is a reward penalty (else the loss has it)."""
        algorithm = self.algorithm
        if isinstance(algorithm, DPO):
            return batch, {}
        several = algorithm.updates_per_batch > 1
        if algorithm.old_logprobs == "trainer" and (several or algorithm.kl_in == "reward"):
            batch = self._with_trainer_logprobs(batch)
        metrics = {}
        if algorithm.kl_in == "reward" and self.reference is not None:
            batch, metrics["kl"] = self._with_kl_rewards(batch, algorithm)
        if self.critic is not None:
            batch = self.critic.with_targets(batch)
        elif batch.token_rewards is not None:  # REINFORCE++ without a baseline
            advantages = reinforce_pp_returns(batch.token_rewards, batch.loss_mask)
            batch = dataclasses.replace(batch, advantages=advantages)
        return batch, metrics

    def _with_kl_rewards(
        self, batch: TensorBatch, algorithm: PolicyGradient
    ) -> tuple[TensorBatch, float]:
        """``batch`` with the outcome reward minus ``kl_coef`` times the KL of pi_old (the
        policy that sampled, as the trainer or the engine computed it) to the reference."""
        assert self.reference is not None and batch.rewards is not None
        reference = self.reference

        def ref_logprobs(micro: TensorBatch) -> Tensor:
            with self._autocast():
                return token_logprobs(reference, micro)

        mask, estimator = batch.loss_mask, algorithm.kl_estimator
        old = (
            batch.trainer_logprobs if batch.trainer_logprobs is not None else batch.engine_logprobs
        )
        ref = per_position(batch, self.trainer.micro_batch_size, ref_logprobs)
        outcome = outcome_rewards(batch.rewards, mask)
        rewards = kl_penalized_rewards(outcome, old, ref, mask, algorithm.kl_coef, estimator)
        kl = aggregate(kl_estimate(old, ref, estimator), mask, "token_mean")
        return dataclasses.replace(batch, token_rewards=rewards), float(kl.item())

    def _with_trainer_logprobs(self, batch: TensorBatch) -> TensorBatch:
        """``batch`` with the trainer's logprobs before any update: pi_old of every update."""

        def logprobs(micro: TensorBatch) -> Tensor:
            with self._autocast():
                return token_logprobs(self.model, micro)

        size = self.trainer.micro_batch_size
        return dataclasses.replace(batch, trainer_logprobs=per_position(batch, size, logprobs))

    def _gradients(self, batch: TensorBatch) -> dict[str, float]:
        algorithm = self.algorithm
        if isinstance(algorithm, DPO):
            assert self.reference is not None, "DPO keeps the reference (needs_reference)"
            size = self.trainer.micro_batch_size
            return dpo_gradients(self.model, self.reference, batch, algorithm, size, self._autocast)
        return self._accumulate_gradients(batch, algorithm)

    def _accumulate_gradients(
        self, batch: TensorBatch, algorithm: PolicyGradient
    ) -> dict[str, float]:
        """Backward over micro-batches so the summed gradient equals one full-batch backward.

        Every aggregation is a weighted mean, so the full-batch loss is the sum of micro-batch
        losses times their share (``miles.algo.share``): of response tokens for ``token_mean``,
        of samples for the sequence means. Token-mean statistics are weighted by token share.
        """
        totals = [0.0] * len(METRICS)
        size = self.trainer.micro_batch_size
        micro_batches = (
            [(micro, 1.0) for micro in split(batch, size)]
            if self.parallel is None
            else self.parallel.micro_batches(batch, size)
        )
        for micro, factor in micro_batches:
            token_share = factor * micro.num_tokens / batch.num_tokens
            weight = factor * share(
                algorithm.aggregation,
                micro.num_tokens,
                batch.num_tokens,
                micro.num_samples,
                batch.num_samples,
            )
            objective = self._micro_batch_loss(micro, algorithm)
            (objective.loss * weight).backward()
            totals = combine(totals, weighted_values(objective, weight, token_share))
        if self.parallel is not None:
            totals = self.parallel.combine(totals)
        return measured(dict(zip(METRICS, totals, strict=True)), algorithm)

    def _micro_batch_loss(self, micro: TensorBatch, algorithm: PolicyGradient) -> MicroObjective:
        with self._autocast():
            logprobs, entropy = token_logprobs_and_entropy(
                self.model, micro, entropy=algorithm.entropy_coef > 0
            )
        ref_logprobs = None
        if self.reference is not None and algorithm.kl_in == "loss":  # kept when kl_coef > 0
            with torch.no_grad(), self._autocast():
                ref_logprobs = token_logprobs(self.reference, micro)
        return policy_objective(logprobs, ref_logprobs, entropy, micro, algorithm)

    def _autocast(self) -> AbstractContextManager[None]:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.trainer.dtype == "bf16"
        )


def _frozen_copy(model: nn.Module) -> nn.Module:
    """The initial policy, the reference pi_ref of the KL term (arXiv:2402.03300, eq. 3) and
    of DPO's implicit reward (arXiv:2305.18290, eq. 7)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference
