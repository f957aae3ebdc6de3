"""Several optimizer steps per batch, the train/inference correction and the entropy bonus, on
the torch backend with a tiny random Llama, against a loop written out here."""

import copy

import pytest
import torch

from miles.algo import aggregate, ppo_clip
from miles.config import GRPO, MismatchCorrection
from miles.trainer import collate, token_logprobs
from tests.unit.trainer.test_torch_backend import MIXED, _trainer, _with_policy_logprobs

torch.set_num_threads(1)

TOKEN_MEAN = {"kl_coef": 0.0, "aggregation": "token_mean", "old_logprobs": "trainer"}


def test_epochs_and_mini_batches_equal_the_written_out_ppo_loop(model_dir: str) -> None:
    """PPO, Algorithm 1 (arXiv:1707.06347): pi_old fixed before the first update, then
    ppo_epochs passes, each over mini_batches consecutive parts, one AdamW step per part."""
    algorithm = GRPO(**TOKEN_MEAN, ppo_epochs=2, mini_batches=2, eps_high=0.28)
    trainer = _trainer(model_dir, algorithm, lr=1e-2, micro_batch_size=64)
    samples = _with_policy_logprobs(trainer, MIXED, noise=0.3)
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    metrics = trainer.train_step(samples)

    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        old = token_logprobs(model, batch)
    half = batch.num_samples // 2
    parts = [slice(0, half), slice(half, batch.num_samples)]
    for _ in range(2):
        for rows in parts:
            optimizer.zero_grad()
            part = batch.rows(rows)
            logprobs = token_logprobs(model, part)
            per_token, _ = ppo_clip(logprobs, old[rows], part.advantages, part.loss_mask, 0.2, 0.28)
            aggregate(per_token, part.loss_mask, "token_mean").backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    assert metrics["optimizer_steps"] == 4
    for (name, mine), theirs in zip(
        trainer.model.named_parameters(), model.parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0, msg=name)


def test_later_updates_see_ratios_away_from_one(model_dir: str) -> None:
    """With pi_old fixed, the second epoch's ratios move and the clip starts to bite; a single
    update per batch would only ever see ratio 1 on-policy."""
    algorithm = GRPO(**TOKEN_MEAN, ppo_epochs=4, eps_low=0.01, eps_high=0.01)
    trainer = _trainer(model_dir, algorithm, lr=5e-2)
    samples = _with_policy_logprobs(trainer, MIXED)
    metrics = trainer.train_step(samples)
    # reported statistics are the first update's: on-policy, so ratio 1 and no clipping
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["clip_frac"] == 0.0
    single = _trainer(model_dir, GRPO(**TOKEN_MEAN), lr=5e-2)
    single.train_step(samples)
    moved = any(
        not torch.equal(a, b)
        for a, b in zip(trainer.model.parameters(), single.model.parameters(), strict=True)
    )
    assert moved


def test_steps_are_deterministic(model_dir: str) -> None:
    algorithm = GRPO(**TOKEN_MEAN, ppo_epochs=2, mini_batches=3)
    first, second = (_trainer(model_dir, algorithm, lr=1e-2) for _ in range(2))
    samples = _with_policy_logprobs(first, MIXED, noise=0.2)
    timings = ("seconds_forward_backward", "seconds_optimizer")
    one, two = (dict(t.train_step(samples)) for t in (first, second))
    assert {k: v for k, v in one.items() if k not in timings} == {
        k: v for k, v in two.items() if k not in timings
    }
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mismatch_metrics_measure_the_engine_gap(model_dir: str) -> None:
    trainer = _trainer(model_dir, GRPO(**TOKEN_MEAN))
    exact = trainer.train_step(_with_policy_logprobs(trainer, MIXED))
    assert exact["mismatch_kl"] == pytest.approx(0.0, abs=1e-6)
    assert exact["mismatch_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    trainer = _trainer(model_dir, GRPO(**TOKEN_MEAN))
    noisy = trainer.train_step(_with_policy_logprobs(trainer, MIXED, noise=0.3))
    assert noisy["mismatch_kl"] > 1e-3
    assert noisy["mismatch_ratio_max"] > noisy["mismatch_ratio_mean"] > 0
    assert noisy["mismatch_masked"] == 0.0


def test_mis_masks_tokens_and_a_cap_nothing_exceeds_changes_nothing(model_dir: str) -> None:
    def step(correction: MismatchCorrection) -> tuple[dict[str, float], list[torch.Tensor]]:
        trainer = _trainer(model_dir, GRPO(**TOKEN_MEAN, correction=correction), lr=1e-2)
        metrics = trainer.train_step(_with_policy_logprobs(trainer, MIXED, noise=0.5))
        return metrics.to_dict(), [p.detach().clone() for p in trainer.model.parameters()]

    off_metrics, off = step(MismatchCorrection())
    loose_metrics, loose = step(MismatchCorrection(mode="mis", cap=1e6))
    tight_metrics, tight = step(MismatchCorrection(mode="mis", cap=1.2))
    assert loose_metrics["mismatch_masked"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(off, loose, strict=True))
    assert tight_metrics["mismatch_masked"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(off, tight, strict=True))
    assert tight_metrics["loss"] != off_metrics["loss"]


def test_entropy_bonus_is_reported_and_moves_the_update(model_dir: str) -> None:
    plain = _trainer(model_dir, GRPO(**TOKEN_MEAN), lr=1e-2)
    bonus = _trainer(model_dir, GRPO(**TOKEN_MEAN, entropy_coef=0.1), lr=1e-2)
    samples = _with_policy_logprobs(plain, MIXED)
    plain_metrics, bonus_metrics = plain.train_step(samples), bonus.train_step(samples)
    assert "entropy" not in plain_metrics
    # a 20-token vocabulary: the entropy of a near-uniform random model is close to log 20
    assert 0 < bonus_metrics["entropy"] <= torch.log(torch.tensor(20.0)).item() + 1e-6
    assert bonus_metrics["loss"] == pytest.approx(
        plain_metrics["loss"] - 0.1 * bonus_metrics["entropy"], abs=1e-6
    )
