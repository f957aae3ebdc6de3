"""The Megatron-core backend on CPU over gloo, against HF and against TorchTrainer.

Each distributed case spawns its ranks as fresh processes (``spawn.run_ranks``; ~4 s of imports
per rank on this machine). The model is a tiny Llama like the addition demo's (its tokenizer, tied
embeddings) but with grouped-query attention, so the fused-QKV layout is exercised: 4 query
heads share 2 key/value heads; plus a Qwen2 with untied embeddings and random q/k/v biases.

Tolerances asserted (max abs differences measured on this machine in brackets):

* logits, Megatron with TP=2 vs HF: 1e-5 [6e-7 Llama, 5e-7 Qwen2];
* HF -> Megatron -> HF weights, and ``save_weights`` before any step: bitwise;
* one GRPO step vs TorchTrainer with TP=2, DP=2 and PP=2: metrics 1e-6 [1.2e-7], clipped
  gradients 1e-7 [3e-9, gradients up to 8e-3], updated weights 1e-5 [1.5e-6] (lr 1e-3: AdamW's
  first step moves a weight by about lr times the sign of its gradient, which amplifies rounding
  in the gradients that are nearly zero);
* resume from ``save_state`` under the same layout: bitwise; resharded from TP=2 to PP=2: 1e-5
  on the weights after the next step [3e-6 at lr 1e-2].
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles.config import GRPO, TrainerConfig
from miles.events import TrainSample

pytest.importorskip("megatron.core", reason="megatron-core is an optional dependency")

from miles.trainer.megatron.model import MegatronLayout
from miles.trainer.megatron.spawn import run_ranks
from tests.contract.test_trainer_backend import make_samples

# The spawned ranks import this module to find their program: transformers' model classes and
# TorchTrainer are imported inside the tests, which keeps each rank's start-up to Megatron's.

pytestmark = pytest.mark.integration

SEED = 0
TP2 = MegatronLayout(tensor_parallel=2)
DP2 = MegatronLayout(data_parallel=2)
PP2 = MegatronLayout(pipeline_parallel=2)
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    initializer_range=0.08,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny GQA Llama for the addition tokenizer, built like ``task.make_model``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parents[2] / "examples" / "addition"))
    import task  # type: ignore[import-not-found]

    directory = tmp_path_factory.mktemp("llama")
    tokenizer = task.build_tokenizer(directory)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **TINY,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Qwen2: untied embeddings and q/k/v biases (random, so their layout matters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(SEED)
    config = Qwen2Config(vocab_size=16, tie_word_embeddings=False, rope_theta=1e6, **TINY)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
    model.save_pretrained(directory)
    return str(directory)


def max_abs_diff(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys(), left.keys() ^ right.keys()
    return max((left[name] - right[name]).abs().max().item() for name in left)


# --- what each rank runs (module level, so the spawned processes can unpickle it) ---


def _logits_and_weights_on_ranks(
    model_dirs: list[str], out: str, rank: int
) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """Per model: (input ids, logits gathered over the vocab shards, save_weights digest)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from miles.trainer.megatron import MegatronTrainer
    from miles.trainer.megatron.backend import causal_mask

    input_ids = torch.randint(2, 14, (3, 9), generator=torch.Generator().manual_seed(SEED))
    position_ids = torch.arange(9).expand(3, -1)
    results = []
    for index, model_dir in enumerate(model_dirs):
        backend = MegatronTrainer(
            model_dir,
            TrainerConfig(threads=1),
            GRPO(kl_coef=0.0, aggregation="token_mean"),
            SEED,
            TP2,
        )
        with torch.no_grad():
            logits = backend.model(input_ids, position_ids, causal_mask(9))
        logits = gather_from_tensor_model_parallel_region(logits)
        results.append((input_ids, logits, backend.save_weights(f"{out}/{index}")))
    return results


def _step_on_ranks(
    model_dir: str,
    layout: MegatronLayout,
    trainer: TrainerConfig,
    grpo: GRPO,
    samples: list[TrainSample],
    rank: int,
) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Metrics, clipped gradients and updated weights (HF names, on rank 0) after one step."""
    from miles.trainer.megatron import MegatronTrainer, hf_io

    backend = MegatronTrainer(model_dir, trainer, grpo, SEED, layout)
    metrics = backend.train_step(samples)
    grads = hf_io.gather_hf_weights(backend.model, backend.arch, select=lambda p: p.grad)
    weights = hf_io.gather_hf_weights(backend.model, backend.arch)
    return metrics, grads, weights


def _steps_with_checkpoint(
    model_dir: str,
    layout: MegatronLayout,
    trainer: TrainerConfig,
    grpo: GRPO,
    samples: list[TrainSample],
    out: str,
    rank: int,
) -> tuple[str, dict[str, float], str]:
    """The uninterrupted run: step, save weights and state, step again, save weights."""
    from miles.trainer.megatron import MegatronTrainer

    backend = MegatronTrainer(model_dir, trainer, grpo, SEED, layout)
    backend.train_step(samples)
    backend.save_weights(f"{out}/weights1")
    state_sha = backend.save_state(f"{out}/state")
    metrics = backend.train_step(samples[::-1])
    return state_sha, metrics, backend.save_weights(f"{out}/weights2")


def _resume_and_step(
    model_dir: str,
    layout: MegatronLayout,
    trainer: TrainerConfig,
    grpo: GRPO,
    samples: list[TrainSample],
    out: str,
    target: str,
    rank: int,
) -> tuple[dict[str, float], str]:
    """A fresh backend on the initial model loads the saved weights and state, then steps."""
    from miles.trainer.megatron import MegatronTrainer

    backend = MegatronTrainer(model_dir, trainer, grpo, SEED, layout)
    backend.load_weights(f"{out}/weights1")
    backend.load_state(f"{out}/state")
    metrics = backend.train_step(samples[::-1])
    return metrics, backend.save_weights(target)


# --- tests ---


def test_conversion_round_trip_is_bitwise(llama_dir: str, qwen2_dir: str) -> None:
    """HF -> full Megatron -> TP=2 shards -> full -> HF, for every tensor of both families."""
    from transformers import AutoConfig

    from miles.trainer.megatron import convert
    from miles.trainer.megatron.architecture import Architecture

    for model_dir in (llama_dir, qwen2_dir):
        original = load_file(f"{model_dir}/model.safetensors")
        arch = Architecture.from_hf(AutoConfig.from_pretrained(model_dir))
        names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
        if not arch.tied_embeddings:
            names.append("output_layer.weight")
        layer_params = [
            "input_layernorm.weight",
            "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight",
            "pre_mlp_layernorm.weight",
            "mlp.linear_fc1.weight",
            "mlp.linear_fc2.weight",
        ]
        if arch.qkv_bias:
            layer_params.append("self_attention.linear_qkv.bias")
        names += [f"decoder.layers.{i}.{p}" for i in range(arch.num_layers) for p in layer_params]
        back: dict[str, torch.Tensor] = {}
        for name in names:
            full = convert.to_megatron(name, original.__getitem__, arch)
            shards = [convert.shard(name, full, rank, 2) for rank in range(2)]
            back.update(convert.to_hf(name, convert.unshard(name, shards), arch))
        assert back.keys() == original.keys()
        assert all(torch.equal(back[name], original[name]) for name in original)


def test_tp2_model_gives_hf_logits_and_saves_the_same_checkpoint(
    llama_dir: str, qwen2_dir: str, tmp_path: Path
) -> None:
    """Loaded into two tensor-parallel ranks, each model computes the HF model's logits, and
    ``save_weights`` gathers and writes back exactly the HF tensors it loaded."""
    from transformers import AutoModelForCausalLM

    model_dirs = [llama_dir, qwen2_dir]
    ranks = run_ranks(
        functools.partial(_logits_and_weights_on_ranks, model_dirs, str(tmp_path)), TP2
    )
    for index, model_dir in enumerate(model_dirs):
        input_ids, logits, digest = ranks[0][index]
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = hf(input_ids=input_ids).logits
        assert (logits - expected).abs().max().item() < 1e-5
        assert torch.equal(ranks[1][index][1], logits)  # rank 1 gathered the same logits

        saved_dir = tmp_path / str(index)
        saved = load_file(saved_dir / "model.safetensors")
        original = load_file(f"{model_dir}/model.safetensors")
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[name], original[name]) for name in original)
        assert (saved_dir / "config.json").is_file()
        assert digest == ranks[1][index][2] and len(digest) == 64


@pytest.mark.parametrize(
    ("layout", "aggregation"),
    [(TP2, "token_mean"), (DP2, "seq_mean_token_mean"), (PP2, "token_mean")],
    ids=["tp2", "dp2", "pp2"],
)
def test_grpo_step_equals_torch_trainer(
    llama_dir: str, layout: MegatronLayout, aggregation: str
) -> None:
    from miles.trainer import TorchTrainer

    # A clip below the gradient norm so the global norm over shards matters; a KL term and
    # engine logprobs so the reference model and ratios != 1 are exercised.
    trainer = TrainerConfig(threads=1, micro_batch_size=2, lr=1e-3, grad_clip=0.05)
    grpo = GRPO(kl_coef=0.1, old_logprobs="engine", aggregation=aggregation)
    samples = make_samples(SEED)

    reference = TorchTrainer(llama_dir, trainer, grpo, SEED)
    expected = reference.train_step(samples)
    expected_grads = {n: p.grad for n, p in reference.model.named_parameters()}
    expected_weights = {n: p.detach() for n, p in reference.model.named_parameters()}

    program = functools.partial(_step_on_ranks, llama_dir, layout, trainer, grpo, samples)
    metrics, grads, weights = run_ranks(program, layout)[0]

    for key in ("loss", "kl", "clip_frac", "ratio_mean", "engine_gap", "grad_norm", "tokens"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    assert expected["grad_norm"] > trainer.grad_clip  # the clip did bite
    assert max_abs_diff(grads, expected_grads) < 1e-7
    assert max_abs_diff(weights, expected_weights) < 1e-5


def test_resume_from_state_continues_bit_for_bit(llama_dir: str, tmp_path: Path) -> None:
    trainer = TrainerConfig(threads=1, micro_batch_size=2, lr=1e-2)
    grpo = GRPO(kl_coef=0.1, old_logprobs="engine", aggregation="token_mean")
    args = (llama_dir, TP2, trainer, grpo, make_samples(SEED), str(tmp_path))
    state_sha, metrics, final_sha = run_ranks(
        functools.partial(_steps_with_checkpoint, *args), TP2
    )[0]
    assert len(state_sha) == 64

    target = str(tmp_path / "resumed")
    resumed, resumed_sha = run_ranks(functools.partial(_resume_and_step, *args, target), TP2)[0]
    assert resumed_sha == final_sha
    for key, value in metrics.items():
        if not key.startswith("seconds"):
            assert resumed[key] == value, key


def test_resume_under_another_layout(llama_dir: str, tmp_path: Path) -> None:
    """A TP=2 checkpoint resumed by a 2-stage pipeline: dist_checkpointing reshards it."""
    trainer = TrainerConfig(threads=1, micro_batch_size=2, lr=1e-2)
    grpo = GRPO(kl_coef=0.1, old_logprobs="engine", aggregation="token_mean")
    samples = make_samples(SEED)
    args = (llama_dir, TP2, trainer, grpo, samples, str(tmp_path))
    _, metrics, _ = run_ranks(functools.partial(_steps_with_checkpoint, *args), TP2)[0]
    resume_args = (llama_dir, PP2, trainer, grpo, samples, str(tmp_path))
    target = tmp_path / "resumed"
    resumed, _ = run_ranks(functools.partial(_resume_and_step, *resume_args, str(target)), PP2)[0]
    assert resumed["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert resumed["grad_norm"] == pytest.approx(metrics["grad_norm"], abs=1e-6)
    uninterrupted = load_file(tmp_path / "weights2" / "model.safetensors")
    assert max_abs_diff(load_file(target / "model.safetensors"), uninterrupted) < 1e-5


def test_ray_group_runs_a_step(ray_cluster: str, llama_dir: str, tmp_path: Path) -> None:
    """Two rank actors in a placement group: rank 0's metrics, HF weights out."""
    from miles.trainer import TorchTrainer
    from miles.trainer.megatron.ray_group import MegatronRayGroup

    trainer = TrainerConfig(threads=1, micro_batch_size=2, lr=1e-3)
    grpo = GRPO(kl_coef=0.0, aggregation="token_mean")
    samples = make_samples(SEED)
    expected = TorchTrainer(llama_dir, trainer, grpo, SEED).train_step(samples)
    group = MegatronRayGroup(llama_dir, trainer, grpo, SEED, TP2)
    try:
        metrics = group.train_step(samples)
        digest = group.save_weights(str(tmp_path))
    finally:
        group.shutdown()
    assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert len(digest) == 64 and (tmp_path / "model.safetensors").is_file()
