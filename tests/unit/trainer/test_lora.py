"""LoRA on the torch backend (``trainer.lora``), on the addition demo's tiny Llama (tied
embeddings): what trains, what the optimizer holds, what the engines get, and a bit-identical
resume."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from miles.config import GRPO, MilesConfig, TrainerConfig
from miles.engine.protocol import GenerateRequest, SamplingParams
from miles.engine.transformers_engine import TransformersEngine
from miles.events import TrainSample
from miles.trainer import TorchTrainer, collate, token_logprobs
from miles.trainer.lora import ADAPTER_FILE

torch.set_num_threads(1)

LORA = {"rank": 4, "alpha": 8}
KL = GRPO(kl_coef=0.1, old_logprobs="engine", aggregation="token_mean")  # uses the reference


def make_trainer(
    model: Path, lora: dict[str, object] | None = None, algorithm: GRPO = KL, lr: float = 1e-2
) -> TorchTrainer:
    config = TrainerConfig.model_validate(
        {"threads": 1, "micro_batch_size": 2, "lr": lr, "lora": LORA if lora is None else lora}
    )
    return TorchTrainer(str(model), config, algorithm, seed=0)


def make_samples(seed: int, count: int = 6, vocab: int = 14) -> list[TrainSample]:
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randrange(2, 6))]
        response = [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 5))]
        samples.append(
            TrainSample(
                sample_id=f"s{seed}/{index}",
                prompt_ids=prompt,
                response_ids=response,
                response_logprobs=[rng.uniform(-3.0, -0.5) for _ in response],
                advantage=rng.uniform(-1.0, 1.0),
                reward=0.0,
                policy_version=0,
            )
        )
    return samples


def adapters(trainer: TorchTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def base_weights(trainer: TorchTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}


def merged_copy(trainer: TorchTrainer) -> torch.nn.Module:
    """peft's own merge, on a copy: the reference the published weights must match."""
    assert trainer.lora is not None
    return copy.deepcopy(trainer.lora).merge_and_unload()


def saved(trainer: TorchTrainer, directory: Path) -> dict[str, torch.Tensor]:
    trainer.save_weights(str(directory))
    return load_file(directory / "model.safetensors")


def test_only_the_adapters_train_and_the_optimizer_holds_only_theirs(tiny_model: Path) -> None:
    trainer = make_trainer(tiny_model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    every_linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.split(".")[-4] for n in trainable} == every_linear  # "all-linear", not lm_head
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in in_optimizer] == [id(p) for p in trainer.trainable]
    assert {id(p) for p in trainer.trainable} == {
        id(p) for p in trainer.model.parameters() if p.requires_grad
    }

    trainer.train_step(make_samples(1))

    moments = trainer.optimizer.state
    assert {id(p) for p in moments} == {id(p) for p in trainer.trainable}
    adapter_count = sum(p.numel() for p in trainer.trainable)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert adapter_count < total / 10


def test_a_step_moves_the_adapters_and_leaves_the_base_bit_for_bit(tiny_model: Path) -> None:
    trainer = make_trainer(tiny_model)
    base, lora = base_weights(trainer), adapters(trainer)
    assert all(not t.any() for n, t in lora.items() if "lora_B" in n)  # starts at the base

    trainer.train_step(make_samples(1))
    trainer.train_step(make_samples(2))  # B is 0 at step 1, so A's gradient is too

    after = base_weights(trainer)
    assert all(torch.equal(after[n], base[n]) for n in base)
    moved = adapters(trainer)
    assert all(not torch.equal(moved[n], lora[n]) for n in lora)


def test_published_weights_are_peft_merge_under_the_base_models_hf_names(
    tiny_model: Path, tmp_path: Path
) -> None:
    trainer = make_trainer(tiny_model)
    trainer.train_step(make_samples(1))
    trainer.train_step(make_samples(2))
    merged = merged_copy(trainer)
    expected = merged.state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))

    # save_weights: the base model's file names (the tied lm_head left out, as save_pretrained)
    written = saved(trainer, tmp_path / "weights")
    assert set(written) == set(load_file(tiny_model / "model.safetensors"))
    assert all(torch.equal(written[name], expected[name]) for name in written)
    # the push paths: every HF name of the model, tied ones included, equal to the saved ones
    named = trainer.named_tensors()
    assert list(named) == list(base.state_dict())
    assert all(torch.equal(named[name], expected[name]) for name in named)
    assert not any(torch.equal(named[n], base.state_dict()[n]) for n in named if "proj" in n)

    # an engine loading the directory serves peft's merged model (to 1e-6)
    engine = TransformersEngine(str(tiny_model), threads=1)
    engine.update_weights_from_disk(str(tmp_path / "weights"), weight_version=1)
    prompt = [5, 6, 12, 7, 8, 13]
    request = GenerateRequest(
        rid="r", input_ids=prompt, sampling_params=SamplingParams(max_new_tokens=4, temperature=0)
    )
    [output] = engine.generate([request])
    assert output.output_ids
    ids = torch.tensor([prompt + output.output_ids])
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.log_softmax(-1)
    positions = range(len(prompt) - 1, ids.shape[1] - 1)
    reference = [logits[0, t, ids[0, t + 1]].item() for t in positions]
    assert output.output_token_logprobs == pytest.approx(reference, abs=1e-6)


def test_save_and_resume_is_bit_identical(tiny_model: Path, tmp_path: Path) -> None:
    """One backend steps three times; another steps once and saves weights, state and RNG; a
    fresh one (the base model and new adapters, as a restarted actor) loads them and steps
    twice: the same weights to the bit."""
    straight = make_trainer(tiny_model)
    for seed in (1, 2, 3):
        straight.train_step(make_samples(seed))

    first = make_trainer(tiny_model)
    first.train_step(make_samples(1))
    first.save_weights(str(tmp_path / "weights"))
    first.save_state(str(tmp_path / "state"))
    rng = first.rng_state()
    del first

    resumed = make_trainer(tiny_model)
    resumed.load_weights(str(tmp_path / "weights"))
    resumed.load_state(str(tmp_path / "state"))
    resumed.set_rng_state(rng)
    for seed in (2, 3):
        resumed.train_step(make_samples(seed))

    expected, actual = adapters(straight), adapters(resumed)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    # what the manifest checks: the same published file, byte for byte
    assert resumed.save_weights(str(tmp_path / "a")) == straight.save_weights(str(tmp_path / "b"))


def test_the_state_file_holds_the_adapter_moments_alone(tiny_model: Path, tmp_path: Path) -> None:
    full = make_trainer(tiny_model, lora={"rank": 0})
    adapted = make_trainer(tiny_model)
    for trainer in (full, adapted):
        trainer.train_step(make_samples(1))
    full.save_state(str(tmp_path / "full"))
    adapted.save_state(str(tmp_path / "lora"))
    state = torch.load(tmp_path / "lora" / adapted.state_file, weights_only=True)
    moments = state["optimizer"]["state"]
    assert len(moments) == len(adapted.trainable)
    assert sum(m["exp_avg"].numel() for m in moments.values()) == sum(
        p.numel() for p in adapted.trainable
    )
    full_size = (tmp_path / "full" / full.state_file).stat().st_size
    assert (tmp_path / "lora" / adapted.state_file).stat().st_size < full_size / 5


def test_the_reference_is_the_base_model_exactly(tiny_model: Path) -> None:
    """pi_ref with the adapters switched off gives the frozen base copy's logprobs bit for bit,
    before and after steps; so a GRPO run with KL trains exactly as against a frozen copy."""
    switched_off = make_trainer(tiny_model)
    frozen = make_trainer(tiny_model)
    assert isinstance(switched_off.lora, PeftModel)
    copy_of_base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    copy_of_base.requires_grad_(False)
    frozen.reference = copy_of_base

    for seed in (1, 2, 3):
        first = switched_off.train_step(make_samples(seed))
        second = frozen.train_step(make_samples(seed))
        assert first.kl == second.kl and first.loss == second.loss
        assert first.kl is not None and (seed == 1 or first.kl > 0)

    batch = collate(make_samples(4), pad_id=0)
    assert switched_off.reference is not None
    with torch.no_grad():
        reference = token_logprobs(switched_off.reference, batch)
        policy = token_logprobs(switched_off.model, batch)
        assert torch.equal(reference, token_logprobs(copy_of_base, batch))
        assert not torch.equal(policy, reference)  # the context gave the adapters back
    after = adapters(switched_off)
    assert all(torch.equal(after[n], adapters(frozen)[n]) for n in after)


def test_loading_weights_without_an_adapter_or_a_tampered_one_is_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    trainer = make_trainer(tiny_model)
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        trainer.load_weights(str(tiny_model))

    trainer.save_weights(str(tmp_path / "weights"))
    adapter = load_file(tmp_path / "weights" / ADAPTER_FILE)
    adapter = {name: tensor + 1 for name, tensor in adapter.items()}
    save_file(adapter, tmp_path / "weights" / ADAPTER_FILE)
    with pytest.raises(ValueError, match="sha256"):
        trainer.load_weights(str(tmp_path / "weights"))


def test_the_checked_file_names_its_adapter_and_the_same_weights_give_the_same_bytes(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The manifest's sha256 of model.safetensors covers the adapter through its metadata,
    which safetensors writes in a random order unless put back in one."""
    trainer = make_trainer(tiny_model)
    digests = {trainer.save_weights(str(tmp_path / f"weights{i}")) for i in range(8)}
    assert len(digests) == 1
    files = {path.name for path in (tmp_path / "weights0").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", ADAPTER_FILE}
    with safe_open(tmp_path / "weights0" / "model.safetensors", framework="pt") as weights:
        assert set(weights.metadata()) == {"format", "miles_lora_adapter_sha256"}


def test_lora_needs_the_torch_backend() -> None:
    with pytest.raises(ValueError, match=r"trainer.lora needs trainer.backend='torch'"):
        MilesConfig.model_validate({"trainer": {"backend": "megatron", "lora": {"rank": 8}}})
    MilesConfig.model_validate({"trainer": {"backend": "megatron", "lora": {"rank": 0}}})
    assert not TrainerConfig().lora.enabled
