"""Typed configuration: one pydantic model, loaded from TOML and ``--set key=value`` overrides.

The resolved config is saved with the run (``runs/<run_id>/config.json``) and its hash is part
of the run record, so a restarted service can tell it is running the same experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from miles.config.algorithm import (
    ALGORITHMS,
    CISPO,
    DAPO,
    DPO,
    GRPO,
    GSPO,
    PPO,
    RLOO,
    Algorithm,
    DrGRPO,
    MismatchCorrection,
    ReinforcePP,
)
from miles.config.lora import LoraConfig
from miles.config.section import Section as _Section
from miles.config.simulated import SimulatedEngineConfig, SimulatedTrainerConfig

__all__ = [
    "ALGORITHMS",
    "CISPO",
    "DAPO",
    "DPO",
    "GRPO",
    "GSPO",
    "OUTAGE_TOLERANCE_SECONDS",
    "PPO",
    "RLOO",
    "Algorithm",
    "BufferConfig",
    "CoordinatorConfig",
    "DataConfig",
    "DrGRPO",
    "HFRewardModel",
    "HTTPRewardModel",
    "InfraConfig",
    "LoraConfig",
    "MilesConfig",
    "MismatchCorrection",
    "ModelConfig",
    "ReinforcePP",
    "RewardConfig",
    "RewardModel",
    "RolloutConfig",
    "RunConfig",
    "SimulatedEngineConfig",
    "SimulatedTrainerConfig",
    "TrackingConfig",
    "TrainerConfig",
    "apply_overrides",
    "load_config",
]


class RunConfig(_Section):
    name: str = Field(
        "miles",
        pattern=r"^[A-Za-z0-9_-]{1,40}$",
        description="Human name; the run id is derived from it, and the run id is part of "
        "every NATS subject and Redis key, so only letters, digits, '_' and '-'.",
    )
    seed: int = Field(0, description="Seeds sampling, data order and initialisation.")
    steps: int = Field(20, ge=1, description="Stop after this many committed optimizer steps.")
    output_dir: Path = Field(Path("runs"), description="Runs write to <output_dir>/<run_id>.")


class ModelConfig(_Section):
    path: Path | None = Field(
        None,
        description="A local Hugging Face model directory (config.json and safetensors, one "
        "file or sharded with an index), or a hub id already in the local Hugging Face cache: "
        "miles never downloads a model.",
    )
    tokenizer_path: Path | None = Field(
        None, description="The tokenizer's directory or cached hub id; None: model.path's."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model's own Python code (transformers' trust_remote_code)."
    )


class DataConfig(_Section):
    train_path: Path | None = Field(
        None,
        description="Training rows: a .jsonl or .parquet file, a directory saved by `datasets` "
        "(save_to_disk), or a local file `datasets` loads (.csv, .json).",
    )
    eval_path: Path | None = Field(
        None, description="Held-out rows, same formats; None: no held-out evaluation."
    )
    eval_size: int = Field(200, ge=1, description="How many held-out prompts an eval uses.")
    prompt_key: str = Field(
        "prompt",
        description="The column with the prompt: a string, or chat messages [{role, content}].",
    )
    label_key: str = Field("label", description="The column handed to the reward as label.")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Render prompts with the tokenizer's chat template (apply_chat_template, "
        "generation prompt added). auto: rows whose prompt is a list of messages are rendered, "
        "strings are used raw; on: strings become one user message; off: never.",
    )
    shuffle: bool = Field(
        True, description="Shuffle the training rows each epoch (from run.seed; resumable)."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Drop rows whose prompt is longer (counted and logged)."
    )


class RolloutConfig(_Section):
    engines: int = Field(1, ge=1, description="Engine actors per rollout replica.")
    engine_num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per engine.")
    engine_threads: int = Field(
        0,
        ge=0,
        description="torch threads inside one CPU engine; 0: this node's cores shared among "
        "what computes at once (MilesConfig.cpu_threads).",
    )
    engine_max_restarts: int = Field(
        3, ge=0, description="Ray restarts of a dead engine actor before it is replaced."
    )
    engine: Literal["local", "sglang", "simulated"] = Field(
        "local",
        description="Every engine is its own server process driven over SGLang's HTTP API: "
        "`sglang` runs `python -m sglang.launch_server` (GPU), `local` miles' CPU server that "
        "serves the same routes on a transformers model. `simulated` (benchmarks and tests): "
        "engines inside the rollout process that sleep instead of computing "
        "(rollout.simulated).",
    )
    simulated: SimulatedEngineConfig = Field(
        default_factory=SimulatedEngineConfig,
        description="The simulated engines' rate, response lengths and weight-load time.",
    )
    engine_num_gpus: float = Field(0, ge=0, description="Ray GPUs held by each engine actor.")
    weight_sync: Literal["blob", "distributed", "tensor"] = Field(
        "blob",
        description="blob: engines load each version from the blob store (a shared directory "
        "or the JetStream Object Store). distributed: the trainer broadcasts it into the "
        "engines over a process group (gloo here, NCCL on GPUs). tensor: engines on the "
        "trainer's node map its memory by handle (CUDA IPC on GPUs, shared memory here). An "
        "engine that missed a push still loads from the blob store.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for a replica's engine bundles."
    )
    engine_host: str = Field(
        "127.0.0.1",
        description="Address engines bind; 0.0.0.0 on a cluster (clients use the node's IP).",
    )
    sglang_args: list[str] = Field(
        default_factory=list,
        description="Extra `sglang.launch_server` arguments, e.g. ['--tp', '2', '--mem-fraction-"
        "static', '0.8'].",
    )
    straggler_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="An engine whose tokens/s stays under this fraction of the fleet's median "
        "is a straggler: flagged, drained and restarted.",
    )
    straggler_patience: int = Field(
        3, ge=1, description="Consecutive slow rounds before an engine is flagged."
    )
    straggler_restarts: int = Field(
        2, ge=0, description="Restarts of a straggler before it stays drained."
    )
    group_size: int = Field(8, ge=1, description="Samples per prompt (the G of GRPO).")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, description="Stop strings (kept in output).")
    tasks_per_fetch: int = Field(8, ge=1, description="Tasks pulled and generated together.")

    @property
    def pushes_weights(self) -> bool:
        """The trainer pushes each version into the engines (else they pull it from blobs)."""
        return self.weight_sync != "blob"

    @property
    def engine_tp(self) -> int:
        """Tensor-parallel ranks per engine: SGLang's ``--tp``/``--tp-size`` in sglang_args."""
        args = self.sglang_args
        for i, arg in enumerate(args):
            flag, _, value = arg.partition("=")
            if flag in ("--tp", "--tp-size", "--tensor-parallel-size"):
                return int(value or args[i + 1])
        return 1


class BufferConfig(_Section):
    groups_per_batch: int = Field(8, ge=1, description="Prompt groups per optimizer step.")
    max_staleness: int = Field(
        0, ge=0, description="0 is strict on-policy; k lets rollout run k versions ahead."
    )
    filter_zero_variance: bool = Field(
        True,
        description="Drop groups whose rewards are all equal (DAPO's dynamic sampling, "
        "arXiv:2503.14476 sec. 3.2): their advantages are 0, so they cost a step and teach "
        "nothing; the coordinator dispatches replacements.",
    )
    max_filter_rounds: int | None = Field(
        None,
        ge=1,
        description="DAPO's max_num_gen_batches: once this many batches' worth of groups were "
        "dropped for zero variance since the last batch, such groups are kept (they train "
        "nothing but let the step go on), so a model that is right on almost every prompt does "
        "not stall the loop. None: keep dropping.",
    )
    inline_batch_bytes: int = Field(
        1 << 20,
        ge=0,
        description="A batch whose event would be larger goes through the blob store (the "
        "event carries its uri and sha256, as weights events do). 0: every batch.",
    )


LAYOUT_FIELDS = ("tensor_parallel", "pipeline_parallel", "data_parallel", "fsdp_ranks")
"""The trainer's layout: any of them set away from its default makes the layout explicit."""


class TrainerConfig(_Section):
    backend: Literal["torch", "fsdp", "megatron", "simulated"] = Field(
        "torch",
        description="torch: one process, the HF model. megatron: Megatron-core GPTModel ranks "
        "as Ray actors in a placement group (tensor/pipeline/data parallel). fsdp: the torch "
        "backend's step on trainer.fsdp_ranks FSDP2 rank actors (gloo on CPU, NCCL on GPUs). "
        "simulated "
        "(benchmarks and tests): sleeps trainer.simulated's time per step, tiny weights.",
    )
    simulated: SimulatedTrainerConfig = Field(
        default_factory=SimulatedTrainerConfig,
        description="The simulated backend's time per step and per sample.",
    )
    tensor_parallel: int = Field(1, ge=1, description="Megatron: tensor-parallel size.")
    pipeline_parallel: int = Field(1, ge=1, description="Megatron: pipeline-parallel size.")
    data_parallel: int = Field(1, ge=1, description="Megatron: data-parallel size.")
    fsdp_ranks: int | None = Field(
        None,
        ge=1,
        description="fsdp: ranks the model is sharded over; None: one per device the trainer "
        "has (trainer.devices; the auto layout).",
    )
    layout: Literal["auto", "explicit"] | None = Field(
        None,
        description="auto: with more than one device, the planner (miles.planner.auto) picks "
        "Megatron's TP/PP/DP or the FSDP2 size for them at the trainer's start and logs why. "
        "explicit: the sizes above as given. None: explicit when any size above is set away "
        "from its default, else auto.",
    )
    devices: int | None = Field(
        None,
        ge=1,
        description="Devices the trainer's layout spans (auto layout); None: on cuda "
        "trainer.num_gpus, else the Ray cluster's GPUs the engines do not hold; on cpu 1.",
    )
    device_memory_gib: float = Field(
        80.0, gt=0, description="Memory of one device, for the auto layout's planner."
    )
    lr: float = Field(1e-4, ge=0, description="The base learning rate (the schedule's peak).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="How the rate moves over the run's steps after the warmup "
        "(miles.trainer.schedule): constant, linear or cosine decay to lr * min_lr_ratio.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Steps of linear warmup from lr / warmup_steps up to lr."
    )
    decay_steps: int | None = Field(
        None, ge=1, description="The step at which the decay ends; None: run.steps."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Where linear and cosine decay end, as a share of lr."
    )
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(32, ge=1, description="Samples per forward/backward.")
    dtype: Literal["fp32", "bf16"] = "fp32"
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved for the trainer actor.")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs reserved for the trainer.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the torch backend trains.")
    threads: int = Field(
        0,
        ge=0,
        description="torch threads inside the trainer actor; 0: this node's cores shared among "
        "what computes at once (MilesConfig.cpu_threads).",
    )
    checkpoint_every: int = Field(
        1,
        ge=1,
        description="Write the full state (optimizer moments, RNG) every K steps; weights are "
        "written every step. A trainer restarted between two full states resumes with moments "
        "up to K-1 steps old, so only K=1 resumes bit for bit.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="torch backend: Ray restarts of a dead trainer actor (an OOM kill, a lost "
        "worker); the service loads the latest manifest into it and retrains the batch in "
        "flight. Megatron's rank group is not restarted in place: its service restarts.",
    )
    keep_checkpoints: int = Field(
        2,
        ge=0,
        description="Committed steps whose checkpoint (weights and full state) stays in the "
        "blob store; older ones are collected after each commit, except the weights of the "
        "last buffer.max_staleness + 2 versions (engines may still load them) and of steps an "
        "export holds. 0 keeps every step.",
    )
    export_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16",
        description="dtype of the model `miles run` exports to runs/<id>/final/ at the end "
        "(and the default of `miles export`).",
    )
    max_shard_bytes: int = Field(
        5 * 1024**3,
        ge=1,
        description="Largest safetensors file of the weights a step publishes: larger weights "
        "go out as model-0000i-of-0000n.safetensors shards and an index (Hugging Face's layout; "
        "miles.shards), the digest in manifests and events covering every shard.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="Low-rank adapters (torch backend): only they train; engines get the "
        "merged weights. rank 0: off.",
    )

    @property
    def auto_layout(self) -> bool:
        """Whether the planner picks the layout (``trainer.layout``). Decided from the values
        and never stored: a config is dumped and validated again with overrides on top (the
        recipe's, then --set), and a stored "auto" would outvote a size set later."""
        if self.layout is not None:
            return self.layout == "auto"
        defaults = TrainerConfig.model_fields
        return all(getattr(self, name) == defaults[name].default for name in LAYOUT_FIELDS)


class CoordinatorConfig(_Section):
    eval_every: int = Field(5, ge=1, description="Evaluate greedy accuracy every K steps.")
    eval_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="An evaluation still missing results after this is recorded with those it "
        "has (an eval task can be lost for good: dead-lettered, or its output oversized).",
    )
    max_groups_in_flight: int = Field(64, ge=1, description="Tasks dispatched, not yet done.")
    heartbeat_seconds: float = Field(2.0, gt=0)
    correct_reward: float = Field(
        1.0, description="A held-out sample counts as correct when its reward is at least this."
    )


class HFRewardModel(_Section):
    """A Hugging Face sequence-classification model scoring (prompt, completion) pairs: its
    first logit is the reward. A Ray actor of the reward service, on CPU or a GPU."""

    kind: Literal["hf"] = "hf"
    name: str = Field("reward_model", description="Its name in reward.weights and metrics.")
    path: Path = Field(description="Local model directory (or a cached hub id).")
    batch_size: int = Field(16, ge=1, description="Pairs per forward pass.")
    max_length: int = Field(
        1024,
        ge=8,
        description="Longer pairs are truncated from the left, so the completion is kept.",
    )
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved for the actor.")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs reserved for the actor (> 0: CUDA).")
    chat_template: bool = Field(
        False,
        description="Score the conversation rendered with the model tokenizer's chat template "
        "(a user turn, then the completion as the assistant's) instead of prompt + completion.",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model's own Python code (transformers' trust_remote_code)."
    )
    max_restarts: int = Field(
        -1,
        ge=-1,
        description="Times Ray restarts the actor after it dies (-1: always); each restart "
        "loads the model again.",
    )
    load_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="How long scoring waits for the actor to load the model (at start and "
        "after a restart) before failing the samples; reward.timeout_seconds bounds each call.",
    )


class HTTPRewardModel(_Section):
    """A reward model behind HTTP: POST ``url`` with ``{"prompts": [...], "completions": [...],
    "labels": [...], "metadata": [...]}`` (one entry per completion of a group, in order; labels
    and metadata are the dataset row's, as JSON), answered by ``{"rewards": [...]}`` (one number
    each, same order). Connection errors, timeouts and 408/429/5xx answers are retried with
    exponential backoff; another 4xx or a malformed answer fails the group's samples."""

    kind: Literal["http"] = "http"
    name: str = Field("remote_reward", description="Its name in reward.weights and metrics.")
    url: str = Field(description="Where to POST, e.g. http://rm:8000/score.")
    timeout_seconds: float = Field(
        30.0, gt=0, description="Per request (reward.timeout_seconds bounds it too)."
    )
    retries: int = Field(3, ge=0, description="Retries of a failed request, with backoff.")
    backoff_seconds: float = Field(
        0.5, ge=0, description="Wait before the first retry, doubled before each next one."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Sent with every request (e.g. Authorization)."
    )


RewardModel = Annotated[HFRewardModel | HTTPRewardModel, Field(discriminator="kind")]


class RewardConfig(_Section):
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight of each reward function or model by name (TRL's reward_weights); "
        "unnamed ones weigh 1. The sample's reward is the weighted sum.",
    )
    concurrency: int = Field(
        8, ge=1, description="Reward calls in flight at once (async functions, threads, models)."
    )
    timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A reward call still running after this fails its samples (recorded on "
        "them) instead of stalling the service.",
    )
    models: list[RewardModel] = Field(
        default_factory=list, description="Reward models, scored next to the recipe's functions."
    )


class TrackingConfig(_Section):
    """Experiment trackers, fed by `miles run` (or `miles track RUN`) from the run record: the
    values ``steps.jsonl`` holds, per step, the held-out accuracy per evaluation and a table of
    held-out completions. Off by default; wandb also reads its own ``WANDB_*`` variables
    (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ``WANDB_DIR``...)."""

    wandb: bool = Field(False, description="Log to Weights & Biases (wandb.init per run).")
    tensorboard: bool = Field(
        False, description="Write TensorBoard event files under runs/<run_id>/tensorboard."
    )
    project: str | None = Field(None, description="wandb project; None: WANDB_PROJECT or 'miles'.")
    entity: str | None = Field(None, description="wandb entity; None: WANDB_ENTITY or yours.")
    completions: int = Field(
        8, ge=0, description="Held-out completions in each evaluation's table (0: no table)."
    )


OUTAGE_TOLERANCE_SECONDS = 120.0
"""The README promises Redis outages of up to two minutes are ridden out (a restart replaying
its AOF, a stalled host)."""


class InfraConfig(_Section):
    nats_url: str | None = Field(None, description="None: start an embedded nats-server.")
    redis_url: str | None = Field(None, description="None: start an embedded redis-server.")
    ray_address: str | None = Field(None, description="None: start a local Ray.")
    blob_store: Literal["dir", "nats"] = Field("dir", description="Where weights are written.")
    blob_dir: Path | None = Field(None, description="Shared directory; default <run>/blobs.")
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    outage_tolerance_seconds: float = Field(
        OUTAGE_TOLERANCE_SECONDS,
        gt=0,
        description="How long an unreachable or stalled Redis (refused connections, or reads "
        "timing out) is ridden out with logged backoff; after it `miles run` stops and prints "
        "the `miles run --resume` line.",
    )
    ack_wait_seconds: float = Field(
        6.0,
        ge=1,
        description="JetStream AckWait: a dead consumer's messages are redelivered after this. "
        "Live consumers send in_progress every third of it during long work.",
    )
    metrics_port: int | None = Field(
        0,
        ge=0,
        le=65535,
        description="Port of this service's Prometheus /metrics. 0: a free port (advertised in "
        "its heartbeat; `miles run` gives each service its own); None: no /metrics server.",
    )
    metrics_addr: str = Field("0.0.0.0", description="Address the /metrics server binds.")

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_off(cls, value: object) -> object:
        """TOML has no null: ``metrics_port = "off"`` (or ``--set infra.metrics_port=off``)."""
        return None if value in ("off", "none") else value


@dataclass(frozen=True)
class CpuThreads:
    engine: int
    trainer: int


class MilesConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: Algorithm = Field(default_factory=GRPO)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    infra: InfraConfig = Field(default_factory=InfraConfig)

    @model_validator(mode="before")
    @classmethod
    def _grpo_unless_named(cls, data: Any) -> Any:
        """An ``[algorithm]`` section without a ``name`` tunes the default, GRPO."""
        if isinstance(data, dict) and isinstance(data.get("algorithm"), dict):
            data["algorithm"] = {"name": "grpo", **data["algorithm"]}
        return data

    @model_validator(mode="after")
    def _groups_need_two(self) -> MilesConfig:
        if self.rollout.group_size < 2 and not isinstance(self.algorithm, DPO):
            raise ValueError(
                f"rollout.group_size must be >= 2: {self.algorithm.name} compares the samples "
                "of a group with each other"
            )
        return self

    @model_validator(mode="after")
    def _megatron_runs_one_update(self) -> MilesConfig:
        algorithm = self.algorithm
        if self.trainer.backend == "megatron" and algorithm.name in ("ppo", "dpo"):
            raise ValueError(
                f"algorithm.name={algorithm.name!r} runs on trainer.backend='torch' only for now"
            )
        if self.trainer.backend == "megatron" and (
            algorithm.updates_per_batch > 1
            or algorithm.entropy_coef > 0
            or algorithm.kl_in == "reward"
        ):
            raise ValueError(
                "trainer.backend='megatron' takes one optimizer step per batch, no entropy "
                "bonus and the KL as a loss term for now: set algorithm.ppo_epochs=1, "
                "algorithm.mini_batches=1, algorithm.entropy_coef=0 and algorithm.kl_in='loss', "
                "or use trainer.backend='torch'"
            )
        return self

    @model_validator(mode="after")
    def _push_needs_one_weight_holder(self) -> MilesConfig:
        if self.rollout.pushes_weights and self.trainer.backend == "megatron":
            raise ValueError(
                f"rollout.weight_sync={self.rollout.weight_sync!r} needs trainer.backend="
                "'torch': Megatron's weights are sharded over its ranks; use 'blob'"
            )
        return self

    @model_validator(mode="after")
    def _simulated_stays_simulated(self) -> MilesConfig:
        if self.trainer.backend == "simulated" and self.rollout.engine != "simulated":
            raise ValueError(
                "trainer.backend='simulated' publishes placeholder weights that only "
                "rollout.engine='simulated' can load"
            )
        if self.rollout.engine == "simulated" and self.rollout.pushes_weights:
            raise ValueError(
                "rollout.engine='simulated' has no server to push weights into: set "
                "rollout.weight_sync='blob'"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_runs_the_policy_gradient(self) -> MilesConfig:
        if self.trainer.backend == "fsdp" and self.algorithm.name in ("ppo", "dpo"):
            raise ValueError(
                f"algorithm.name={self.algorithm.name!r} runs on trainer.backend='torch' only: "
                "trainer.backend='fsdp' shards the policy alone (no critic, no DPO pairs)"
            )
        if self.trainer.backend == "fsdp" and self.rollout.pushes_weights:
            raise ValueError(
                f"rollout.weight_sync={self.rollout.weight_sync!r} needs trainer.backend="
                "'torch': the fsdp ranks gather their weights into a blob; use 'blob'"
            )
        return self

    @model_validator(mode="after")
    def _lora_needs_torch(self) -> MilesConfig:
        if self.trainer.lora.enabled and self.trainer.backend != "torch":
            raise ValueError(
                "trainer.lora needs trainer.backend='torch' (peft wraps the HF model); set "
                "trainer.lora.rank=0 for Megatron"
            )
        return self

    def cpu_threads(self, cores: int | None = None) -> CpuThreads:
        """The torch threads of each engine and of the trainer: the ones set, else ``cores``
        (this node's) shared among the processes that compute at the same time.

        Strict on-policy, rollout and training alternate: the engines share the cores while
        they generate, the trainer has them all while it trains. With ``max_staleness`` > 0
        they overlap, and two threads each on two cores made the demo 38% slower than strict
        on-policy (OpenMP threads spinning on a busy core); a share each made it 23% faster.
        """
        cores = cores or os.cpu_count() or 1
        engines = self.rollout.engines
        overlapping = self.buffer.max_staleness > 0 and not isinstance(self.algorithm, DPO)
        at_once = engines + 1 if overlapping else engines
        return CpuThreads(
            engine=self.rollout.engine_threads or max(1, cores // at_once),
            trainer=self.trainer.threads or max(1, cores // (at_once if overlapping else 1)),
        )

    def algorithm_resolved(self) -> Algorithm:
        """``algorithm`` with ``old_logprobs`` and ``norm_tokens`` decided.

        One update per batch on strict on-policy data: the trainer's logprobs are pi_old. Stale
        data: the engine's, which importance-correct for the versions in between.
        """
        if isinstance(self.algorithm, DPO):
            return self.algorithm  # no ratio and no length constant
        update: dict[str, object] = {}
        if self.algorithm.old_logprobs == "auto":
            on_policy = self.buffer.max_staleness == 0
            update["old_logprobs"] = "trainer" if on_policy else "engine"
        if self.algorithm.norm_tokens is None:
            update["norm_tokens"] = self.rollout.max_new_tokens
        return self.algorithm.model_copy(update=update)

    def hash(self) -> str:
        """A stable digest of what changes the experiment (infra and tracking excluded)."""
        body = self.model_dump(mode="json", exclude={"infra", "tracking"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values parse as TOML (``lr=1e-5``, ``stop=["\\n"]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: treat as a string
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def load_config(
    base: MilesConfig | None = None, toml_path: Path | None = None, overrides: Sequence[str] = ()
) -> MilesConfig:
    """Recipe defaults, then a TOML file, then ``--set`` overrides, validated once at the end."""
    data = base.model_dump(mode="json") if base else {}
    layers = [tomllib.loads(Path(toml_path).read_text())] if toml_path is not None else []
    layers.append(apply_overrides({}, list(overrides)))
    for layer in layers:
        _switch_algorithm(data, layer)
        _deep_merge(data, layer)
    return MilesConfig.model_validate(data)


def _switch_algorithm(data: dict[str, Any], layer: dict[str, Any]) -> None:
    """A layer that names another algorithm starts it from its paper's defaults: the fields
    of the one it replaces (which it may not even have) are dropped first."""
    name = layer.get("algorithm", {}).get("name")
    if name is not None and name != data.get("algorithm", {}).get("name", "grpo"):
        data["algorithm"] = {}


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
