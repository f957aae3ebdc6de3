"""``trainer.layout = "auto"`` on this machine's CPU ranks: the trainer service's start lays two
Megatron ranks out as the planner says, the run builds that layout, and its step is the step
of the same layout set by hand, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles.config import load_config
from miles.recipe import Recipe
from services.trainer.actor import build_backend
from services.trainer.layout import with_layout
from tests.contract.test_trainer_backend import make_samples

pytest.importorskip("megatron.core", reason="megatron-core is an optional dependency")

pytestmark = pytest.mark.integration

SIZES = ("tensor_parallel", "pipeline_parallel", "data_parallel")


def test_the_planned_layout_trains_as_the_same_layout_set_by_hand(
    ray_cluster: str, tiny_model: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    common = [
        f"model.path='{tiny_model}'",
        "trainer.backend=megatron",
        "trainer.lr=1e-2",
        "trainer.micro_batch_size=2",
        "trainer.num_cpus=1",
    ]
    auto = with_layout(load_config(overrides=[*common, "trainer.devices=2"]))
    sizes = {name: getattr(auto.trainer, name) for name in SIZES}
    assert sizes["tensor_parallel"] * sizes["pipeline_parallel"] * sizes["data_parallel"] == 2
    explicit = load_config(overrides=[*common, *(f"trainer.{k}={v}" for k, v in sizes.items())])
    assert not explicit.trainer.auto_layout

    trained = {}
    for name, config in (("auto", auto), ("explicit", explicit)):
        recipe = Recipe(path=tmp_path / "recipe.py", config=config, rewards={})
        backend = build_backend(config, recipe)
        try:
            backend.train_step(make_samples(1))
            backend.save_weights(str(tmp_path / name))
        finally:
            backend.shutdown()  # type: ignore[attr-defined]
        trained[name] = load_file(tmp_path / name / "model.safetensors")
    assert trained["auto"].keys() == trained["explicit"].keys()
    assert all(torch.equal(trained["auto"][k], trained["explicit"][k]) for k in trained["auto"])
