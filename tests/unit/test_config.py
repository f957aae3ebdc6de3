"""Typed config: recipe defaults, then TOML, then ``--set`` overrides, validated once."""

from pathlib import Path

import pydantic
import pytest

from miles.config import (
    BufferConfig,
    InfraConfig,
    MilesConfig,
    RunConfig,
    TrainerConfig,
    load_config,
)


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        """
[run]
name = "from-toml"
steps = 7

[rollout]
group_size = 4
temperature = 0.7

[trainer]
lr = 3e-4
"""
    )
    return path


def test_toml_then_overrides(toml_file: Path) -> None:
    base = MilesConfig(
        run=RunConfig(seed=5), buffer=BufferConfig(groups_per_batch=3, max_staleness=1)
    )
    config = load_config(
        base,
        toml_file,
        [
            "trainer.lr=1e-5",  # a float
            'rollout.stop=["\\n", "="]',  # a TOML list
            "buffer.filter_zero_variance=false",  # a bool
            "coordinator.eval_every=3",  # an int
            "run.name=bare-word",  # not TOML: taken as a string
            "infra.blob_dir=/tmp/blobs",  # coerced to the field's type
        ],
    )
    assert config.run.name == "bare-word"
    assert config.run.steps == 7  # from the TOML
    assert config.run.seed == 5  # from the recipe's defaults
    assert config.rollout.group_size == 4
    assert config.rollout.temperature == 0.7
    assert config.rollout.stop == ["\n", "="]
    assert config.trainer.lr == 1e-5
    assert config.buffer.filter_zero_variance is False
    assert config.buffer.groups_per_batch == 3  # nested defaults survive a partial section
    assert config.buffer.max_staleness == 1
    assert config.coordinator.eval_every == 3
    assert config.infra.blob_dir == Path("/tmp/blobs")


def test_defaults_without_base_or_toml() -> None:
    assert load_config() == MilesConfig()


def test_override_creates_nested_sections() -> None:
    assert load_config(overrides=["algorithm.eps_high=0.28"]).algorithm.eps_high == 0.28


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.group_size=1", "group_size must be >= 2"),
        ("trainer.lr=-0.1", "greater than or equal to 0"),
        ("trainer.nope=1", "Extra inputs are not permitted"),
        ("nosection.x=1", "Extra inputs are not permitted"),
        ("rollout.temperature=3", "less than or equal to 2"),
        ('trainer.lr="fast"', "valid number"),
    ],
)
def test_validation_errors(override: str, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        load_config(overrides=[override])


def test_malformed_override() -> None:
    with pytest.raises(ValueError, match="key=value"):
        load_config(overrides=["trainer.lr"])


def test_assignment_is_validated() -> None:
    config = MilesConfig()
    with pytest.raises(pydantic.ValidationError):
        config.trainer.lr = -1.0


def test_hash_is_stable_and_ignores_infra() -> None:
    config = MilesConfig(trainer=TrainerConfig(lr=1e-3))
    again = MilesConfig.model_validate_json(config.model_dump_json())
    assert config.hash() == again.hash()
    assert len(config.hash()) == 16
    elsewhere = config.model_copy(
        update={"infra": InfraConfig(nats_url="nats://x:4222", ray_address="10.0.0.1:6379")}
    )
    assert elsewhere.hash() == config.hash()
    assert MilesConfig(trainer=TrainerConfig(lr=2e-3)).hash() != config.hash()


def test_a_weight_push_needs_the_torch_backend() -> None:
    for how in ("distributed", "tensor"):
        with pytest.raises(pydantic.ValidationError, match="Megatron's weights are sharded"):
            load_config(overrides=[f"rollout.weight_sync={how}", "trainer.backend=megatron"])
    assert load_config(overrides=["rollout.weight_sync=tensor"]).rollout.pushes_weights
    assert not load_config().rollout.pushes_weights


@pytest.mark.parametrize(
    ("args", "tp"),
    [([], 1), (["--tp", "2"], 2), (["--mem-fraction-static", "0.7", "--tp-size=4"], 4)],
)
def test_engine_tp_comes_from_the_sglang_args(args: list[str], tp: int) -> None:
    config = MilesConfig()
    config.rollout.sglang_args = args
    assert config.rollout.engine_tp == tp
