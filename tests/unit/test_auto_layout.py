"""``trainer.layout = "auto"`` (``miles.planner.auto``): the planner's choice for the devices
the trainer has, an explicit layout winning, and the trainer service's start applying it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.config import TrainerConfig, load_config
from miles.planner.auto import choose_layout, model_spec
from miles.planner.plan import build_plan
from miles.planner.presets import MODEL_PRESETS
from miles.planner.specs import Cluster, PlanOptions
from services.trainer.layout import trainer_devices, with_layout

LLAMA_8B = MODEL_PRESETS["llama3-8b"]
HF_TINY = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 14,
    "tie_word_embeddings": True,
}


def test_a_hugging_face_config_becomes_the_planners_model() -> None:
    spec = model_spec(HF_TINY, seq_length=40)
    assert (spec.num_layers, spec.hidden_size, spec.num_kv_heads) == (4, 64, 2)
    assert (spec.ffn_hidden_size, spec.vocab_size, spec.seq_length) == (128, 14, 40)
    assert spec.tied_embeddings
    without_gqa = model_spec({k: v for k, v in HF_TINY.items() if k != "num_key_value_heads"}, 8)
    assert without_gqa.num_kv_heads == 4


def test_fsdp_shards_over_every_device() -> None:
    choice = choose_layout(TrainerConfig(backend="fsdp"), model_spec(HF_TINY, 40), 4, 64)
    assert choice.update == {"fsdp_ranks": 4}
    assert "sharded 4 ways" in choice.reasons[0]


def test_megatron_takes_the_plans_fastest_runnable_layout() -> None:
    """The choice of `miles plan` for the same cluster, among the layouts miles' Megatron
    ranks run (no CP, EP or virtual stages): 8B on 8 GPUs of 80 GiB cannot be pure DP."""
    trainer = TrainerConfig(backend="megatron", micro_batch_size=1)
    choice = choose_layout(trainer, LLAMA_8B, 8, 128)
    sizes = ("tensor_parallel", "pipeline_parallel", "data_parallel")
    tp, pp, dp = (choice.update[name] for name in sizes)
    assert tp * pp * dp == 8 and (tp, pp) != (1, 1)
    options = PlanOptions(
        global_batch=128, micro_batch=1, distributed_optimizer=False, interleaved_pipeline=False
    )
    plan = build_plan(LLAMA_8B, Cluster(gpus_per_node=8), options)
    runnable = [
        c.layout
        for c in plan.candidates
        if c.fits and c.layout.cp == c.layout.ep == c.layout.vp == 1 and c.layout.gpus == 8
    ]
    assert (runnable[0].tp, runnable[0].pp, runnable[0].dp) == (tp, pp, dp)
    assert choice.reasons[0].startswith(f"Megatron {runnable[0].label()} on 8 device(s)")


def test_a_layout_the_config_sets_wins() -> None:
    for trainer in (
        TrainerConfig(backend="fsdp", fsdp_ranks=2),
        TrainerConfig(backend="megatron", tensor_parallel=2),
        TrainerConfig(backend="fsdp", layout="explicit"),
    ):
        assert not trainer.auto_layout
        assert choose_layout(trainer, model_spec(HF_TINY, 40), 4, 64).update == {}
    assert TrainerConfig(backend="fsdp", fsdp_ranks=3, layout="auto").auto_layout


def test_a_size_set_after_the_recipe_still_wins() -> None:
    """The recipe's config is dumped and validated again under --set: "auto" is never stored,
    so a size given later is not outvoted by a default the recipe's dump carried."""
    recipe = load_config(overrides=["trainer.backend=fsdp"])
    assert recipe.trainer.auto_layout
    assert not load_config(base=recipe, overrides=["trainer.fsdp_ranks=3"]).trainer.auto_layout


def test_one_device_or_one_process_leaves_nothing_to_choose() -> None:
    spec = model_spec(HF_TINY, 40)
    assert choose_layout(TrainerConfig(backend="megatron"), spec, 1, 64).update == {}
    assert choose_layout(TrainerConfig(backend="torch"), spec, 4, 64).update == {}


def test_the_trainer_starts_with_the_planned_layout(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HF_TINY))
    config = load_config(
        overrides=[f"model.path='{tmp_path}'", "trainer.backend=fsdp", "trainer.devices=3"]
    )
    assert with_layout(config).trainer.fsdp_ranks == 3
    explicit = load_config(base=config, overrides=["trainer.fsdp_ranks=2"])
    assert with_layout(explicit).trainer.fsdp_ranks == 2
    on_cpu = load_config(overrides=[f"model.path='{tmp_path}'", "trainer.backend=fsdp"])
    assert trainer_devices(on_cpu) == 1
    assert with_layout(on_cpu).trainer.fsdp_ranks == 1


@pytest.mark.parametrize(("num_gpus", "devices"), [(4, 4), (0, 6)])
def test_gpus_come_from_the_trainer_or_what_the_engines_leave(
    monkeypatch: pytest.MonkeyPatch, num_gpus: int, devices: int
) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 8.0, "CPU": 64.0})
    config = load_config(
        overrides=[
            "trainer.device='cuda'",
            f"trainer.num_gpus={num_gpus}",
            "rollout.engines=2",
            "rollout.engine_num_gpus=1",
        ]
    )
    assert trainer_devices(config) == devices
