"""The parallelism planner against hand calculations, the paper it implements, and published
layouts.

Published layouts come from NVIDIA NeMo's tuned H100 recipes
(NVIDIA/NeMo scripts/performance/recommended_model_configs/model_configs_h100.csv, bf16
pre-training rows) and from Korthikanti et al. 2022 (arXiv:2205.05198) Table 3. Our cost model
is coarse (fixed MFU, no kernel-efficiency effects), so a published layout must either be the
planner's choice or fit in memory and come within TOLERANCE of the best estimated step time.
"""

from __future__ import annotations

import json

import pytest

from miles.cli import plan as plan_cli
from miles.planner import (
    GPU_PRESETS,
    MODEL_PRESETS,
    Cluster,
    Layout,
    ModelSpec,
    PlanError,
    PlanOptions,
    build_plan,
    layer_activation_bytes,
)
from miles.planner.memory import GIB, training_memory
from miles.planner.search import Candidate, evaluate, rank, tensor_parallel_sizes

TOLERANCE = 0.05
"""A published layout may be at most 5% slower than the planner's best, by our estimate."""


def h100s(nodes: int) -> Cluster:
    return GPU_PRESETS["h100"].model_copy(update={"nodes": nodes})


def published_and_best(
    model: ModelSpec, cluster: Cluster, options: PlanOptions, layout: Layout
) -> tuple[Candidate, Candidate]:
    fitting, _ = rank(model, cluster, options)
    return evaluate(model, cluster, options, layout), fitting[0]


# -- parameters and static memory -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        # Totals as published on each model card / paper.
        ("llama3-8b", 8.03, 8.03),
        ("llama3-70b", 70.6, 70.6),
        ("qwen2.5-1.5b", 1.54, 1.54),
        ("qwen2.5-7b", 7.61, 7.61),
        ("qwen2.5-72b", 72.7, 72.7),
        ("mixtral-8x7b", 46.7, 12.9),  # Mistral AI: 46.7B total, 12.9B used per token
        ("gpt3-175b", 175.0, 175.0),
    ],
)
def test_shapes_give_the_published_parameter_counts(name: str, total: float, active: float) -> None:
    model = MODEL_PRESETS[name]
    assert model.total_params / 1e9 == pytest.approx(total, rel=0.01)
    assert model.active_params / 1e9 == pytest.approx(active, rel=0.01)


def test_params_override_scales_the_counts() -> None:
    model = MODEL_PRESETS["llama3-8b"].model_copy(update={"params_billion": 7.0})
    assert model.total_params == pytest.approx(7e9)


def test_mixed_precision_adam_is_16_bytes_per_parameter() -> None:
    # ZeRO (arXiv:1910.02054 §3.1): 2 (fp16 weights) + 2 (fp16 grads) + 12 (fp32 master, m, v)
    # = 16 bytes per parameter, 112 GB for 7B parameters before any sharding.
    model = MODEL_PRESETS["llama3-8b"].model_copy(update={"params_billion": 7.0})
    options = PlanOptions(grad_dtype="bf16", distributed_optimizer=False, global_batch=1)
    memory = training_memory(model, options, Layout(tp=1, pp=1, cp=1, dp=1))
    state_bytes = (memory.weights_gib + memory.gradients_gib + memory.optimizer_gib) * GIB
    assert state_bytes == pytest.approx(112e9)


def test_megatron_distributed_optimizer_is_6_plus_12_over_d_bytes() -> None:
    # Megatron-LM docs/distrib_optimizer.md: bf16 params, fp32 grads: 6 + 12/d bytes/param.
    model = MODEL_PRESETS["llama3-8b"].model_copy(update={"params_billion": 7.0})
    options = PlanOptions(global_batch=8)
    memory = training_memory(model, options, Layout(tp=1, pp=1, cp=1, dp=8))
    state_bytes = (memory.weights_gib + memory.gradients_gib + memory.optimizer_gib) * GIB
    assert state_bytes == pytest.approx(7e9 * (6 + 12 / 8))


# -- activations: Korthikanti et al. 2022 -------------------------------------------------------

GPT3 = MODEL_PRESETS["gpt3-175b"]
S, B, H, A, T = 2048, 1, GPT3.hidden_size, GPT3.num_attention_heads, 8


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, S * B * H * (34 + 5 * A * S / H)),  # §4.1, no parallelism
        ({"tp": T}, S * B * H * (10 + 24 / T + 5 * A * S / (H * T))),  # §4.2.1, TP
        ({"tp": T, "sequence_parallel": True}, S * B * H / T * (34 + 5 * A * S / H)),  # §4.2.2
        ({"tp": T, "sequence_parallel": True, "recompute": "selective"}, 34 * S * B * H / T),
        ({"recompute": "full"}, 2 * S * B * H),  # only the layer input is kept
    ],
)
def test_layer_activations_match_korthikanti_equations(
    kwargs: dict[str, object], expected: float
) -> None:
    got = layer_activation_bytes(GPT3, seq=S, micro_batch=B, **kwargs)  # type: ignore[arg-type]
    assert got == pytest.approx(expected)


def test_first_pipeline_stage_holds_all_layers_worth_of_activations() -> None:
    # Korthikanti §4.2.3: under 1F1B the first stage keeps p micro-batches of L/p layers, so
    # with selective recomputation and sequence parallelism it stores 34·sbhL/t.
    options = PlanOptions(global_batch=64, flash_attention=False, interleaved_pipeline=False)
    layout = Layout(tp=T, pp=8, cp=1, dp=1, recompute="selective")
    memory = training_memory(GPT3, options, layout)
    assert memory.activations_gib * GIB == pytest.approx(34 * S * B * H * GPT3.num_layers / T)


# -- published layouts ---------------------------------------------------------------------------


def test_gpt3_175b_on_64_a100_is_korthikanti_table3_layout() -> None:
    # Table 3: GPT-3 175B on 64 A100-80GB at TP=8, PP=8, sequence 2048, micro-batch 1; we take a
    # global batch of 64 (one micro-batch per pipeline slot) and no FlashAttention, as in 2022.
    cluster = GPU_PRESETS["a100-80gb"].model_copy(update={"nodes": 8})
    options = PlanOptions(global_batch=64, flash_attention=False, rollout_concurrency=8)
    plan = build_plan(GPT3, cluster, options)
    assert (plan.choice.layout.tp, plan.choice.layout.pp, plan.choice.layout.dp) == (8, 8, 1)
    assert plan.choice.layout.recompute == "selective"  # the paper's point: no full recompute


def test_llama3_70b_on_64_h100_matches_nemo_tp_and_cp() -> None:
    # NeMo: llama3 70b, 64 H100, seq 8192, GBS 128, MBS 1: TP=4 PP=4 CP=2 (VP=5).
    # Planner: TP=4 PP=8 VP=5 CP=2 DP=1; NeMo's layout is estimated 0.6% slower.
    model, options = MODEL_PRESETS["llama3-70b"], PlanOptions(global_batch=128)
    published, best = published_and_best(model, h100s(8), options, Layout(tp=4, pp=4, cp=2, dp=2))
    assert (best.layout.tp, best.layout.cp) == (4, 2)
    assert published.fits and published.layout.recompute == "none"
    assert published.time.total_s <= best.time.total_s * (1 + TOLERANCE)


def test_llama3_8b_on_8_h100_uses_tp1_like_nemo() -> None:
    # NeMo: llama3 8b, 8 H100, seq 8192, GBS 128, MBS 1: TP=1 PP=1 CP=2, no recomputation.
    # Planner: TP=1 PP=2 VP=8 DP=4. Our model puts NeMo's layout at 75.1 GiB per GPU, over the
    # default 72 GiB budget (10% headroom), so there it needs full recomputation; NeMo runs it
    # with under 5 GiB to spare. With 5% headroom it fits and ties with the best.
    model = MODEL_PRESETS["llama3-8b"]
    layout = Layout(tp=1, pp=1, cp=2, dp=4)
    plan = build_plan(model, h100s(1), PlanOptions(global_batch=128))
    assert plan.choice.layout.tp == 1
    tight = PlanOptions(global_batch=128, memory_headroom=0.05)
    published, best = published_and_best(model, h100s(1), tight, layout)
    assert published.fits and published.layout.recompute == "none"
    assert published.time.total_s <= best.time.total_s * (1 + TOLERANCE)


def test_mixtral_8x7b_on_64_h100_nemo_layout_is_near_best() -> None:
    # NeMo: mixtral 8x7b, 64 H100, seq 4096, GBS 256, MBS 1: TP=1 PP=4 EP=8 (VP=8).
    # Planner: TP=2 PP=8 VP=4 DP=4 (EP=1: we do not model grouped-GEMM efficiency, so EP only
    # saves memory here); NeMo's layout is estimated 2.1% slower.
    model = MODEL_PRESETS["mixtral-8x7b"].model_copy(update={"seq_length": 4096})
    published, best = published_and_best(
        model, h100s(8), PlanOptions(global_batch=256), Layout(tp=1, pp=4, cp=1, dp=16, ep=8)
    )
    assert published.fits
    assert published.time.total_s <= best.time.total_s * (1 + TOLERANCE)


def test_gpt3_175b_on_128_h100_matches_nemo_tp() -> None:
    # NeMo: gpt3 175b, 128 H100, seq 2048, GBS 256, MBS 1: TP=4 PP=8 (VP=6).
    # Planner: TP=4 PP=16 VP=6 DP=2; NeMo's layout is estimated 2.2% slower.
    options = PlanOptions(global_batch=256, rollout_concurrency=8)
    published, best = published_and_best(GPT3, h100s(16), options, Layout(tp=4, pp=8, cp=1, dp=4))
    assert best.layout.tp == 4
    assert published.fits
    assert published.time.total_s <= best.time.total_s * (1 + TOLERANCE)


# -- structure, rollout, errors ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_candidate_obeys_the_layout_rules(name: str) -> None:
    model = MODEL_PRESETS[name].model_copy(update={"seq_length": 8192})
    cluster = h100s(8)
    options = PlanOptions(global_batch=256, rollout_concurrency=4)
    plan = build_plan(model, cluster, options)
    for candidate in plan.candidates:
        layout = candidate.layout
        assert layout.gpus == cluster.gpus
        assert layout.tp <= cluster.gpus_per_node  # TP never crosses a node
        assert model.num_attention_heads % layout.tp == 0
        assert model.num_kv_heads % layout.tp == 0
        assert model.num_layers % (layout.pp * layout.vp) == 0
        assert (model.num_experts or 1) % layout.ep == 0 and layout.dp % layout.ep == 0
    fitting = [c for c in plan.candidates if c.fits]
    assert plan.choice == min(fitting, key=lambda c: c.time.total_s)


def test_gqa_limits_tensor_parallelism() -> None:
    # Qwen2.5-7B: 28 heads and 4 KV heads, so TP 8 is impossible on an 8-GPU node.
    assert tensor_parallel_sizes(MODEL_PRESETS["qwen2.5-7b"], h100s(1)) == [1, 2, 4]


def test_rollout_engine_is_the_smallest_tp_holding_weights_and_kv_cache() -> None:
    # Llama-3-70B bf16 is 131 GiB: TP=2 leaves no room for 32 × 8192 tokens of KV cache
    # (2 · 80 layers · 8 KV heads · 128 · 2 bytes = 320 KiB per token, 80 GiB in all).
    plan = build_plan(MODEL_PRESETS["llama3-70b"], h100s(4), PlanOptions(global_batch=128))
    rollout = plan.rollout
    assert (rollout.engine_tp, rollout.engines, rollout.gpus) == (4, 8, 32)
    assert sorted(rollout.too_small) == [1, 2]
    assert rollout.memory.kv_cache_gib == pytest.approx(80 / 4)


def test_split_mode_gives_rollout_whole_nodes_or_a_share_of_one() -> None:
    model = MODEL_PRESETS["qwen2.5-1.5b"]
    two_nodes = build_plan(model, h100s(2), PlanOptions(mode="split"))
    assert (two_nodes.train_gpus, two_nodes.rollout.gpus) == (8, 8)
    quarter = PlanOptions(mode="split", rollout_fraction=0.25, global_batch=96)
    one_node = build_plan(model, h100s(1), quarter)
    assert (one_node.train_gpus, one_node.rollout.gpus) == (6, 2)
    assert "Split" in one_node.explanation[-1]


def test_explanation_names_the_choice_and_what_limited_the_rest() -> None:
    plan = build_plan(MODEL_PRESETS["llama3-70b"], h100s(8), PlanOptions())
    text = " ".join(plan.explanation)
    assert plan.choice.layout.label() in plan.explanation[0]
    assert "runner-up" in text and "do not fit" in text and "TP can only be 1, 2, 4, 8" in text


def test_70b_on_one_24gib_gpu_says_the_weights_do_not_fit() -> None:
    cluster = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=24)
    with pytest.raises(PlanError, match=r"weights alone take 131\.4 GiB") as error:
        build_plan(MODEL_PRESETS["llama3-70b"], cluster, PlanOptions(global_batch=1))
    assert "24 GiB" in str(error.value) and "21.6 GiB usable" in str(error.value)


def test_activations_named_when_they_are_what_does_not_fit() -> None:
    model = MODEL_PRESETS["qwen2.5-1.5b"].model_copy(update={"seq_length": 262144})
    cluster = Cluster(nodes=1, gpus_per_node=1, gpu_memory_gib=80)
    with pytest.raises(PlanError, match=r"activations take .* GiB even with full recomputation"):
        build_plan(model, cluster, PlanOptions(global_batch=1))


def test_no_valid_layout_lists_the_rules() -> None:
    cluster = Cluster(nodes=1, gpus_per_node=3)
    with pytest.raises(PlanError, match="PP must divide 32 layers"):
        build_plan(MODEL_PRESETS["llama3-8b"], cluster, PlanOptions(global_batch=128))


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    code = plan_cli.main(["--model", "llama3-8b", "--gpus", "8", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0
    assert plan["choice"]["layout"]["tp"] * plan["choice"]["layout"]["pp"] >= 1
    assert plan["choice"]["memory"]["total_gib"] <= plan["usable_gib"]
    assert plan["rollout"]["engines"] * plan["rollout"]["engine_tp"] == 8
    assert plan["explanation"]


def test_cli_table_marks_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_cli.main(["--model", "qwen2.5-7b", "--seq-len", "4096", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "→" in out and "rollout (SGLang)" in out and "Training uses" in out


def test_cli_overrides_reach_every_section() -> None:
    parser = plan_cli.argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model=llama3-8b",
            "--gpus=16",
            "--seq-len=4096",
            "--set=num_layers=16",
            "--set=options.mfu=0.5",
            "--set=inter_node_gbps=25",
        ]
    )
    model, cluster, options = plan_cli.resolve_inputs(args)
    assert (model.num_layers, model.seq_length, model.hidden_size) == (16, 4096, 4096)
    assert (cluster.nodes, cluster.gpus_per_node, cluster.inter_node_gbps) == (2, 8, 25)
    assert options.mfu == 0.5


def test_cli_reports_a_bad_field_and_an_infeasible_plan(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert plan_cli.main(["--model", "llama3-8b", "--set", "layers=3"]) == 2
    assert "num_layers" in capsys.readouterr().err
    assert plan_cli.main(["--model", "llama3-70b", "--gpus", "1", "--json"]) == 2
    assert "weights alone" in json.loads(capsys.readouterr().out)["error"]
