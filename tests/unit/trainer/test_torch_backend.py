"""The plain-PyTorch backend on a tiny random Llama: batching, equivalence, steps, weights."""

import hashlib
from pathlib import Path

import msgspec
import pytest
import torch

from miles.config import GRPO, TrainerConfig
from miles.events import TrainSample
from miles.trainer import TensorBatch, TorchTrainer, collate, split, token_logprobs

torch.set_num_threads(1)


def _trainer(model_dir: str, grpo: GRPO | None = None, **trainer: object) -> TorchTrainer:
    config = TrainerConfig.model_validate({"threads": 1, **trainer})
    return TorchTrainer(
        model_dir, config, grpo or GRPO(kl_coef=0.0, aggregation="token_mean"), seed=0
    )


def _sample(
    prompt: list[int], response: list[int], advantage: float, logprobs: list[float] | None = None
) -> TrainSample:
    return TrainSample(
        sample_id=f"s{prompt}{response}",
        prompt_ids=prompt,
        response_ids=response,
        response_logprobs=logprobs if logprobs is not None else [0.0] * len(response),
        advantage=advantage,
        reward=0.0,
        policy_version=0,
    )


def _with_policy_logprobs(
    trainer: TorchTrainer, samples: list[TrainSample], noise: float = 0.0
) -> list[TrainSample]:
    """Fill ``response_logprobs`` as the engine would (plus optional noise: a stale policy)."""
    generator = torch.Generator().manual_seed(1)
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        logprobs = token_logprobs(trainer.model, batch)
    filled = []
    for row, sample in enumerate(samples):
        start = len(sample.prompt_ids) - 1
        response = logprobs[row, start : start + len(sample.response_ids)]
        response = response + noise * torch.randn(response.shape, generator=generator)
        filled.append(msgspec.structs.replace(sample, response_logprobs=response.tolist()))
    return filled


MIXED = [
    _sample([1, 2, 3], [4, 5], advantage=1.0),
    _sample([6], [7, 8, 9, 10, 11], advantage=-0.5),
    _sample([12, 13], [14], advantage=0.7),
    _sample([2, 4, 6, 8], [1, 3, 5], advantage=-1.2),
    _sample([9, 9], [10, 11, 12, 13], advantage=0.3),
]


def test_collate_aligns_next_token_positions() -> None:
    batch = collate(
        [
            _sample([1, 2, 3], [4, 5], advantage=1.0, logprobs=[-0.1, -0.2]),
            _sample([6], [7, 8, 9], advantage=-2.0, logprobs=[-0.3, -0.4, -0.5]),
        ],
        pad_id=0,
    )
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t scores input_ids[t + 1]: response token 4 sits at index 3, scored at t = 2
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    expected_logprobs = torch.tensor([[0, 0, -0.1, -0.2], [-0.3, -0.4, -0.5, 0]])
    torch.testing.assert_close(batch.engine_logprobs, expected_logprobs)
    assert batch.advantages.tolist() == [1.0, -2.0]
    assert (batch.num_samples, batch.num_tokens) == (2, 5)


def test_split_trims_each_chunk_to_its_longest_sample() -> None:
    chunks = split(collate(MIXED, pad_id=0), micro_batch_size=2)
    assert [chunk.input_ids.shape for chunk in chunks] == [(2, 6), (2, 7), (1, 6)]
    assert [chunk.loss_mask.shape[1] for chunk in chunks] == [5, 6, 5]
    assert sum(chunk.num_tokens for chunk in chunks) == 15


def test_token_logprobs_equal_log_softmax_gather(model_dir: str) -> None:
    model = _trainer(model_dir).model
    batch = collate(MIXED[:2], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
        expected = torch.log_softmax(logits[:, :-1], dim=-1)
        expected = expected.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        actual = token_logprobs(model, batch)
    assert actual.shape == (2, 5)
    real = batch.attention_mask[:, 1:].bool()  # padded positions may differ: attention mask
    torch.testing.assert_close(actual[real], expected[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "grpo",
    [
        GRPO(aggregation="token_mean", eps_high=0.28, kl_coef=0.0),
        GRPO(aggregation="seq_mean_token_mean", kl_coef=0.0),
        GRPO(aggregation="token_mean", kl_coef=0.1, kl_estimator="k3"),
    ],
    ids=["token", "sequence", "token-kl"],
)
def test_micro_batches_equal_one_full_batch(model_dir: str, grpo: GRPO) -> None:
    full = _trainer(model_dir, grpo, micro_batch_size=5, lr=1e-3)
    micro = _trainer(model_dir, grpo, micro_batch_size=2, lr=1e-3)
    # off-policy logprobs so that some tokens are clipped
    samples = _with_policy_logprobs(full, MIXED, noise=0.3)

    # two steps: on the second the policy has moved off the reference, so the KL has a gradient
    for _ in range(2):
        full_metrics = full.train_step(samples)
        micro_metrics = micro.train_step(samples)

    assert full_metrics["clip_frac"] > 0
    assert (full_metrics["kl"] > 0) == (grpo.kl_coef > 0)
    for key in ("loss", "kl", "clip_frac", "ratio_mean", "grad_norm", "tokens"):
        assert micro_metrics[key] == pytest.approx(full_metrics[key], abs=1e-6), key
    for (name, p_full), p_micro in zip(
        full.model.named_parameters(), micro.model.parameters(), strict=True
    ):
        assert p_full.grad is not None and p_micro.grad is not None
        torch.testing.assert_close(p_micro.grad, p_full.grad, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(p_micro, p_full, atol=1e-6, rtol=0, msg=name)


def test_zero_lr_leaves_weights_unchanged(model_dir: str) -> None:
    trainer = _trainer(model_dir, lr=0.0, weight_decay=0.1)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    metrics = trainer.train_step(_with_policy_logprobs(trainer, MIXED))
    assert metrics["grad_norm"] > 0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_positive_advantage_raises_its_logprob(model_dir: str) -> None:
    trainer = _trainer(model_dir, lr=1e-3)
    samples = _with_policy_logprobs(trainer, [_sample([1, 2, 3], [4, 5, 6], advantage=1.0)])
    batch = collate(samples, pad_id=0)

    metrics = trainer.train_step(samples)

    with torch.no_grad():
        after = (token_logprobs(trainer.model, batch) * batch.loss_mask).sum()
    before = sum(samples[0].response_logprobs)
    assert after > before
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_frac"] == 0.0
    assert metrics["kl"] == 0.0
    assert metrics["tokens"] == 3.0


def test_kl_is_zero_on_the_first_step_against_the_initial_policy(model_dir: str) -> None:
    assert _trainer(model_dir).reference is None
    trainer = _trainer(model_dir, GRPO(kl_coef=0.5, aggregation="token_mean"))
    metrics = trainer.train_step(_with_policy_logprobs(trainer, MIXED))
    assert trainer.reference is not None
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)


def test_bf16_autocast_step_runs(model_dir: str) -> None:
    trainer = _trainer(model_dir, dtype="bf16")
    metrics = trainer.train_step(_with_policy_logprobs(trainer, MIXED))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_save_weights_hash_and_load_round_trip(model_dir: str, tmp_path: Path) -> None:
    trainer = _trainer(model_dir, lr=1e-2)
    saved = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

    digest = trainer.save_weights(str(tmp_path))

    assert (tmp_path / "config.json").is_file()
    assert digest == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    trainer.train_step(_with_policy_logprobs(trainer, MIXED))
    assert not torch.equal(next(trainer.model.parameters()), next(iter(saved.values())))
    trainer.load_weights(str(tmp_path))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_update_fn_replaces_the_builtin_step(model_dir: str) -> None:
    calls = []

    def update_fn(
        model: torch.nn.Module, batch: TensorBatch, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        calls.append((model, batch, optimizer))
        return {"loss": 0.5}

    config = TrainerConfig(threads=1)
    trainer = TorchTrainer(
        model_dir, config, GRPO(kl_coef=0.0, aggregation="token_mean"), seed=0, update_fn=update_fn
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]

    assert trainer.train_step(MIXED) == {"loss": 0.5}

    [(model, batch, optimizer)] = calls
    assert model is trainer.model and optimizer is trainer.optimizer
    assert batch.input_ids.shape == (5, 7) and batch.num_tokens == 15
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), before, strict=True))
