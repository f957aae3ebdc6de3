"""Typed config: recipe defaults, then TOML, then ``--set`` overrides, validated once."""

from pathlib import Path

import pydantic
import pytest

from miles.config import (
    ALGORITHMS,
    GRPO,
    RLOO,
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


# --- the algorithm ------------------------------------------------------------------------------


def test_every_algorithm_loads_with_its_paper_defaults() -> None:
    for name in ALGORITHMS:
        assert load_config(overrides=[f"algorithm.name={name}"]).algorithm.name == name
    gspo = load_config(overrides=["algorithm.name=gspo"]).algorithm
    assert (gspo.eps_low, gspo.eps_high, gspo.policy_loss) == (3e-4, 4e-4, "gspo")
    assert load_config(overrides=["algorithm.name=dapo"]).algorithm.eps_high == 0.28
    assert load_config(overrides=["algorithm.name=rloo"]).algorithm.advantage == "rloo"
    dr = load_config(overrides=["algorithm.name=dr_grpo"]).algorithm
    assert (dr.std, dr.aggregation) == ("none", "seq_mean_token_sum_norm")
    grpo = MilesConfig().algorithm
    assert (grpo.name, grpo.kl_coef, grpo.aggregation) == ("grpo", 0.04, "seq_mean_token_mean")


def test_switching_algorithm_starts_from_its_defaults_not_the_recipes() -> None:
    base = MilesConfig(algorithm=GRPO(eps_high=0.5, std="bessel"))
    # GRPO's std would be refused by RLOO (extra field): the switch drops GRPO's fields first
    switched = load_config(base, overrides=["algorithm.name=rloo", "algorithm.eps_low=0.1"])
    assert isinstance(switched.algorithm, RLOO)
    assert (switched.algorithm.eps_low, switched.algorithm.eps_high) == (0.1, 0.2)
    same = load_config(base, overrides=["algorithm.name=grpo"])
    assert same.algorithm == base.algorithm  # naming the same algorithm keeps the recipe's


def test_an_algorithm_section_without_a_name_tunes_grpo(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[algorithm]\neps_high = 0.3\n")
    assert load_config(toml_path=toml).algorithm == GRPO(eps_high=0.3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.name=ppo_lite"], "does not match any of the expected tags"),
        (["algorithm.name=rloo", "algorithm.std=bessel"], "Input should be 'none'"),
        (["algorithm.name=rloo", "algorithm.overlong_cache=0.1"], "Extra inputs are not permitted"),
        (["algorithm.baseline=false"], "Extra inputs are not permitted"),
        (["algorithm.name=gspo", "algorithm.policy_loss=ppo_clip"], "Input should be 'gspo'"),
        (["algorithm.ppo_epochs=0"], "greater than or equal to 1"),
        (["algorithm.dual_clip=1"], "greater than 1"),
        (
            ["algorithm.correction.mode=tis", "algorithm.old_logprobs=engine"],
            "needs algorithm.old_logprobs = 'trainer' or 'auto'",
        ),
        (
            ["trainer.backend=megatron", "algorithm.ppo_epochs=2"],
            "takes one optimizer step per batch",
        ),
        (
            ["trainer.backend=megatron", "algorithm.name=ppo"],
            "runs on trainer.backend='torch' only",
        ),
        (["trainer.backend=megatron", "algorithm.name=dpo"], "runs on trainer.backend='torch'"),
        (["trainer.backend=fsdp", "algorithm.name=ppo"], "shards the policy alone"),
        (["trainer.backend=fsdp", "trainer.lora.rank=4"], "trainer.lora needs trainer.backend"),
        (["trainer.backend=fsdp", "rollout.weight_sync=tensor"], "gather their weights"),
        (["trainer.backend=fsdp", "trainer.fsdp_ranks=0"], "greater than or equal to 1"),
        (["algorithm.name=dpo", "algorithm.kl_coef=0.1"], "Extra inputs are not permitted"),
        (["algorithm.name=dpo", "algorithm.beta=0"], "greater than 0"),
        (["algorithm.kl_in=reward"], "kl_in = 'reward' needs per-token advantages"),
        (["algorithm.name=reinforce_pp", "algorithm.kl_in=reward"], "baseline = false"),
        (
            [
                "trainer.backend=megatron",
                "algorithm.name=reinforce_pp",
                "algorithm.baseline=false",
                "algorithm.kl_in=reward",
            ],
            "the KL as a loss term for now",
        ),
    ],
)
def test_algorithm_errors_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        load_config(overrides=overrides)


def test_resolved_algorithm_decides_pi_old_and_the_length_constant() -> None:
    strict = load_config(overrides=["algorithm.name=dr_grpo", "rollout.max_new_tokens=12"])
    assert strict.algorithm_resolved().old_logprobs == "trainer"
    assert strict.algorithm_resolved().norm_tokens == 12
    stale = load_config(overrides=["buffer.max_staleness=2"])
    assert stale.algorithm_resolved().old_logprobs == "engine"


def test_cpu_threads_share_the_cores_among_what_computes_at_once() -> None:
    config = MilesConfig()
    # strict on-policy: the engine and the trainer take turns, each gets every core
    assert (config.cpu_threads(2).engine, config.cpu_threads(2).trainer) == (2, 2)
    config.buffer.max_staleness = 1  # they overlap: one share each
    assert (config.cpu_threads(2).engine, config.cpu_threads(2).trainer) == (1, 1)
    config.rollout.engines = 3
    assert (config.cpu_threads(8).engine, config.cpu_threads(8).trainer) == (2, 2)
    config.rollout.engine_threads, config.trainer.threads = 4, 3  # set: kept
    assert (config.cpu_threads(8).engine, config.cpu_threads(8).trainer) == (4, 3)
