"""The Megatron-core training backend: one object per rank; ``MegatronRayGroup`` drives them as
one ``TrainerBackend``.

Every rank is one process that has joined the gloo group (``distributed.initialize``) and gets
the whole batch. A step:

1. collates the batch exactly as TorchTrainer does, gives data-parallel replica ``r`` its
   ``r``-th contiguous block of samples, and splits that block into micro-batches;
2. runs Megatron's pipeline schedule (``get_forward_backward_func``: no pipelining, or 1F1B
   across stages) with the algorithm's loss on the last stage, each micro-batch's loss weighted
   by its share of the *whole* batch, so the gradients summed over micro-batches and replicas
   are the full-batch gradient (``TorchTrainer._accumulate_gradients`` does the same over
   micro-batches);
3. sums gradients over data parallelism, clips by the global norm, steps AdamW.

Precision: fp32 weights, gradients, moments and compute. ``dtype="bf16"`` is refused: CPU
autocast does not reach the backward of Megatron's linear layers (their autograd functions use
``custom_fwd``/``custom_bwd`` for ``"cuda"``, so backward mixes bf16 and fp32 operands), and
Megatron's own bf16 path (``bf16=True``, fp32 main weights in
``Float16OptimizerWithFloat16Params``) is CUDA-only.

Weights cross to the engines as HF safetensors (``hf_io``); the full training state goes through
``dist_checkpointing`` (``checkpoint``).
"""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor
from transformers import AutoConfig

from miles.config import Algorithm, TrainerConfig
from miles.config.algorithm import PolicyGradient
from miles.events import TrainSample
from miles.trainer.batch import TensorBatch, collate, split
from miles.trainer.megatron import checkpoint, distributed, hf_io
from miles.trainer.megatron.architecture import Architecture
from miles.trainer.megatron.loss import METRICS, policy_micro_batch_loss, vocab_parallel_logprobs
from miles.trainer.megatron.model import MegatronLayout, build_gpt_model
from miles.trainer.objective import MAX_METRICS, measured
from miles.trainer.protocol import StepMetrics

PAD_ID = 0
"""As TorchTrainer's: right padding never reaches a real position, and loss_mask drops it."""


class MegatronTrainer:
    """This rank's share of the policy; call every method on every rank, in the same order."""

    def __init__(
        self,
        model_path: str,
        trainer: TrainerConfig,
        algorithm: Algorithm,
        seed: int,
        layout: MegatronLayout,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("call miles.trainer.megatron.distributed.initialize() first")
        if trainer.dtype != "fp32":
            raise NotImplementedError("the Megatron backend trains in fp32 only (see module doc)")
        if not isinstance(algorithm, PolicyGradient):
            raise NotImplementedError(f"algorithm {algorithm.name!r} runs on the torch backend")
        if trainer.threads:  # 0: as resolved by MilesConfig.cpu_threads, else torch's own
            torch.set_num_threads(trainer.threads)
        torch.manual_seed(seed)
        self.trainer = trainer
        self.algorithm: PolicyGradient = algorithm
        self.layout = layout
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.arch = Architecture.from_hf(self.hf_config)
        self.arch.check_tensor_parallel(layout.tensor_parallel)
        self.model = self._load_model(model_path)
        self.reference = self._load_model(model_path) if algorithm.kl_coef > 0 else None
        if self.reference is not None:
            self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=trainer.lr,
            betas=trainer.betas,
            weight_decay=trainer.weight_decay,
        )
        checkpoint.init_adamw_state(self.optimizer)
        self._forward_backward = get_forward_backward_func()

    def train_step(self, samples: list[TrainSample]) -> StepMetrics:
        """One optimizer step; the metrics are the whole batch's, equal on every rank."""
        batch = collate(samples, PAD_ID)
        micros = split(self._data_parallel_block(batch), self.trainer.micro_batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        ref_logprobs = self._reference_logprobs(micros)
        outputs = self._run_schedule(self.model, micros, batch, ref_logprobs, forward_only=False)
        distributed.reduce_gradients(self.model, self._tied_embedding_copy())
        backward_done = time.perf_counter()
        grad_norm = distributed.clip_grad_norm(self.model, self.trainer.grad_clip)
        self.optimizer.step()
        totals = self._sum_over_batch([out for out in outputs if isinstance(out, Tensor)])
        return StepMetrics.from_mapping(
            {
                **measured(dict(zip(METRICS, totals.tolist(), strict=True)), self.algorithm),
                "grad_norm": grad_norm,
                "tokens": float(batch.num_tokens),
                "optimizer_steps": 1.0,  # one update per batch on this backend (the config)
                "seconds_forward_backward": backward_done - started,
                "seconds_optimizer": time.perf_counter() - backward_done,
            }
        )

    def scale_learning_rate(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.trainer.lr * factor

    def save_weights(self, directory: str) -> str:
        """HF-named safetensors and ``config.json``, written by rank 0; their digest."""
        tensors = hf_io.gather_hf_weights(self.model, self.arch)
        digest = [""]
        if dist.get_rank() == 0:
            digest[0] = hf_io.write_hf_weights(
                directory, tensors, self.hf_config, self.trainer.max_shard_bytes
            )
        dist.broadcast_object_list(digest, src=0)
        return str(digest[0])

    def load_weights(self, directory: str) -> None:
        """Policy weights from HF safetensors; the optimizer moments and the reference are kept."""
        hf_io.load_hf_weights(self.model, directory, self.arch)

    def named_tensors(self) -> dict[str, Tensor]:
        """Every HF tensor on global rank 0, ``{}`` on the others (as ``save_weights`` gathers
        them). Collective: call it on every rank."""
        return hf_io.gather_hf_weights(self.model, self.arch)

    def save_state(self, directory: str) -> str:
        return checkpoint.save_state(self.model, self.optimizer, directory)

    def load_state(self, directory: str) -> None:
        checkpoint.load_state(self.model, self.optimizer, directory)

    def rng_state(self) -> str:
        return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def set_rng_state(self, encoded: str) -> None:
        raw = bytearray(base64.b64decode(encoded))
        torch.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

    def _load_model(self, model_path: str) -> GPTModel:
        model = build_gpt_model(self.arch, self.layout)
        hf_io.load_hf_weights(model, model_path, self.arch)
        # No dropout is configured; eval mode also matches TorchTrainer's model.eval().
        model.eval()
        return model

    def _data_parallel_block(self, batch: TensorBatch) -> TensorBatch:
        replicas = parallel_state.get_data_parallel_world_size()
        if batch.num_samples < replicas:
            raise ValueError(f"{batch.num_samples} samples cannot feed {replicas} replicas")
        replica = parallel_state.get_data_parallel_rank()
        rows = slice(
            batch.num_samples * replica // replicas, batch.num_samples * (replica + 1) // replicas
        )
        return batch.rows(rows)

    def _reference_logprobs(self, micros: list[TensorBatch]) -> list[Tensor] | None:
        """pi_ref's logprobs per micro-batch on the last stage (a forward-only schedule)."""
        if self.reference is None:
            return None
        with torch.no_grad():
            outputs = self._run_schedule(self.reference, micros, None, None, forward_only=True)
        if not parallel_state.is_pipeline_last_stage():
            return None  # earlier stages never evaluate the loss
        return [out for out in outputs if isinstance(out, Tensor)]

    def _run_schedule(
        self,
        model: GPTModel,
        micros: list[TensorBatch],
        batch: TensorBatch | None,
        ref_logprobs: list[Tensor] | None,
        forward_only: bool,
    ) -> list[object]:
        """Megatron's schedule; returns what the loss function reported per micro-batch.

        Training: each micro-batch's weighted ``METRICS``. ``batch=None`` (forward only): each
        micro-batch's logprobs. Only the last pipeline stage reports anything.
        """
        positions = iter(range(len(micros)))

        def forward_step(data: Iterator[TensorBatch], model: GPTModel) -> tuple[Tensor, object]:
            micro = next(data)
            index = next(positions)
            width = micro.input_ids.shape[1]
            position_ids = torch.arange(width).unsqueeze(0).expand_as(micro.input_ids)
            output = model(micro.input_ids, position_ids, causal_mask(width))
            ref = None if ref_logprobs is None else ref_logprobs[index]
            return output, functools.partial(self._loss, micro, batch, ref)

        return list(
            self._forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(micros),
                model=[model],
                num_microbatches=len(micros),
                seq_length=max(m.input_ids.shape[1] for m in micros),
                micro_batch_size=max(m.num_samples for m in micros),
                forward_only=forward_only,
            )
        )

    def _loss(
        self,
        micro: TensorBatch,
        batch: TensorBatch | None,
        ref_logprobs: Tensor | None,
        logits: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Megatron's loss-function contract: (loss to backward, token count, what to report).

        With ``calculate_per_token_loss`` the schedule backpropagates the loss as returned.
        """
        logprobs = vocab_parallel_logprobs(logits, micro.input_ids)
        tokens = torch.tensor(micro.num_tokens, dtype=torch.int)
        if batch is None:
            return logprobs.sum() * 0.0, tokens, logprobs.detach()
        result = policy_micro_batch_loss(logprobs, ref_logprobs, micro, batch, self.algorithm)
        return result.loss, tokens, result.weighted

    def _sum_over_batch(self, weighted: list[Tensor]) -> Tensor:
        """The batch's ``METRICS`` on every rank: one copy per micro-batch across the world.

        Only the last stage's tensor-parallel rank 0 of each replica contributes, since every
        tensor-parallel rank computes the same loss.
        """
        totals = torch.zeros(len(METRICS), dtype=torch.float64)
        maxima = torch.zeros(len(METRICS), dtype=torch.float64)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            for values in weighted:
                totals += values
                maxima = torch.maximum(maxima, values)
        dist.all_reduce(totals)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        for index, name in enumerate(METRICS):
            if name in MAX_METRICS:
                totals[index] = maxima[index]
        return totals

    def _tied_embedding_copy(self) -> Tensor | None:
        """The tied embedding matrix when pipeline stages hold two copies of it, else None."""
        if not self.arch.tied_embeddings or self.layout.pipeline_parallel == 1:
            return None
        weight: Tensor | None = self.model.shared_embedding_or_output_weight()
        return weight


@functools.lru_cache(maxsize=16)
def causal_mask(width: int) -> Tensor:
    """``[1, 1, T, T]``, True where attention is masked (a later key): Megatron's convention.

    Passed explicitly because Megatron's default causal mask is allocated on ``"cuda"``.
    """
    return torch.triu(torch.ones(width, width, dtype=torch.bool), diagonal=1)[None, None]
