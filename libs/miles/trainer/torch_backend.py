"""The plain-PyTorch training backend: one process, one HF causal LM, AdamW, on CPU.

One ``train_step`` is one on-policy GRPO update (Shao et al. 2024, arXiv:2402.03300, eq. 3 with
a single inner iteration): the behaviour logprobs come from the engine that sampled the batch,
so the importance ratio starts at 1 and clipping only matters if trainer and engine disagree
numerically or the batch is stale (``buffer.max_staleness > 0``).

Precision: weights, gradients and AdamW moments are always fp32. ``dtype="bf16"`` runs the
forward under CPU autocast to bf16 (matmuls in bf16, softmax and loss in fp32), which is the
honest CPU analogue of mixed-precision training with fp32 master weights; saved weights stay fp32.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors.torch import load_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from miles.config import GRPOConfig, TrainerConfig
from miles.events import TrainSample
from miles.trainer.batch import TensorBatch, collate, split, token_logprobs
from miles.trainer.objective import MicroObjective, grpo_objective
from miles.trainer.protocol import StepMetrics

UpdateFn = Callable[[nn.Module, TensorBatch, torch.optim.Optimizer], dict[str, float]]
"""A user's whole update: loss, backward and ``optimizer.step()``; returns its metrics."""

PAD_ID = 0
"""Any valid id works: right padding follows every real token, so causal attention never lets a
real position see it, and ``loss_mask`` drops the predictions made at padded positions."""

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


class TorchTrainer:
    """The ``TrainerBackend`` of one process: the HF model, AdamW, a frozen reference."""

    state_file = STATE_FILE

    def __init__(
        self,
        model_path: str,
        trainer: TrainerConfig,
        grpo: GRPOConfig,
        seed: int,
        update_fn: UpdateFn | None = None,
    ) -> None:
        torch.set_num_threads(trainer.threads)
        torch.manual_seed(seed)
        self.trainer = trainer
        self.grpo = grpo
        self.update_fn = update_fn
        self.device = torch.device(trainer.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.to(self.device)  # type: ignore[arg-type]  # transformers types .to oddly
        # Eval mode switches dropout off: the ratio pi_theta / pi_old compares against an engine
        # that sampled without dropout. Gradients flow all the same.
        self.model.eval()
        self.reference = _frozen_copy(self.model) if grpo.kl_coef > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=trainer.lr,
            betas=trainer.betas,
            weight_decay=trainer.weight_decay,
        )

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        batch = collate(samples, PAD_ID).to(self.device)
        if self.update_fn is not None:
            return StepMetrics.from_mapping(self.update_fn(self.model, batch, self.optimizer))

        self.optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        metrics = self._accumulate_gradients(batch)
        backward_done = time.perf_counter()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.trainer.grad_clip)
        self.optimizer.step()
        return StepMetrics.from_mapping(
            {
                **metrics,
                "grad_norm": grad_norm.item(),
                "tokens": float(batch.num_tokens),
                "seconds_forward_backward": backward_done - started,
                "seconds_optimizer": time.perf_counter() - backward_done,
            }
        )

    def save_weights(self, directory: str) -> str:
        # transformers 5 always writes safetensors (``safe_serialization`` is gone) and keeps HF
        # parameter names (``save_original_format=True`` by default).
        self.model.save_pretrained(directory)
        with open(Path(directory) / WEIGHTS_FILE, "rb") as weights:
            return hashlib.file_digest(weights, "sha256").hexdigest()

    def load_weights(self, directory: str) -> None:
        """Load policy weights in place; the optimizer moments and the reference are kept."""
        # safetensors' load_model knows that tied parameters were saved once.
        load_model(self.model, Path(directory) / WEIGHTS_FILE, device=str(self.device))

    def named_tensors(self) -> dict[str, Tensor]:
        return dict(self.model.state_dict())

    def save_state(self, directory: str) -> str:
        """Optimizer moments and the RNG, for a resume that continues bit for bit."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / STATE_FILE
        state = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        torch.save(state, path)
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def load_state(self, directory: str) -> None:
        # weights_only: tensors and plain containers, nothing else is ever unpickled.
        state = torch.load(
            Path(directory) / STATE_FILE, map_location=self.device, weights_only=True
        )
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    def rng_state(self) -> str:
        return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def set_rng_state(self, encoded: str) -> None:
        raw = bytearray(base64.b64decode(encoded))
        torch.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

    def _accumulate_gradients(self, batch: TensorBatch) -> dict[str, float]:
        """Backward over micro-batches so the summed gradient equals one full-batch backward.

        Both aggregations are weighted means, so the full-batch loss is the sum of micro-batch
        losses times their share: of response tokens for ``token`` aggregation, of samples for
        ``sequence`` aggregation. Token-mean statistics are weighted by the token share.
        """
        totals = dict.fromkeys(("loss", "kl", "clip_frac", "ratio_mean", "engine_gap"), 0.0)
        for micro in split(batch, self.trainer.micro_batch_size):
            token_share = micro.num_tokens / batch.num_tokens
            if self.grpo.loss_aggregation == "token":
                share = token_share
            else:
                share = micro.num_samples / batch.num_samples
            objective = self._micro_batch_loss(micro)
            (objective.loss * share).backward()
            totals["loss"] += objective.loss.item() * share
            totals["kl"] += objective.kl * share
            totals["clip_frac"] += objective.stats.clip_fraction * token_share
            totals["ratio_mean"] += objective.stats.ratio_mean * token_share
            totals["engine_gap"] += objective.engine_gap * token_share
        return totals

    def _micro_batch_loss(self, micro: TensorBatch) -> MicroObjective:
        with self._autocast():
            logprobs = token_logprobs(self.model, micro)
        ref_logprobs = None
        if self.reference is not None:  # kept only when kl_coef > 0
            with torch.no_grad(), self._autocast():
                ref_logprobs = token_logprobs(self.reference, micro)
        return grpo_objective(logprobs, ref_logprobs, micro, self.grpo)

    def _autocast(self) -> AbstractContextManager[None]:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.trainer.dtype == "bf16"
        )


def _frozen_copy(model: nn.Module) -> nn.Module:
    """The initial policy, the reference pi_ref of the KL term (arXiv:2402.03300, eq. 3)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference
