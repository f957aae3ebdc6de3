"""PPO with a critic on the torch backend: GAE targets from a value model, the clipped value
loss, and the critic's weights and moments resumed with the trainer's state."""

import math
from pathlib import Path

import pytest
import torch

from miles.algo.advantages import gae
from miles.algo.value import clipped_value_loss, masked_whiten, outcome_rewards
from miles.config import PPO
from miles.trainer import collate
from tests.unit.trainer.test_torch_backend import MIXED, _trainer, _with_policy_logprobs

torch.set_num_threads(1)


def _rewarded(trainer, rewards=(1.0, 0.0, 1.0, 0.0, 1.0)):  # type: ignore[no-untyped-def]
    samples = _with_policy_logprobs(trainer, MIXED)
    for sample, reward in zip(samples, rewards, strict=False):
        sample.reward = reward
    return samples


def test_outcome_reward_sits_on_the_last_response_token() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.float64)
    rewards = outcome_rewards(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), mask)
    assert rewards.tolist() == [[0, 0, 2, 0], [0, 0, 0, -1], [0, 0, 0.5, 0]]


def test_clipped_value_loss_is_the_larger_error() -> None:
    # old 0, returns 1, clip 0.2: V = 0.5 -> clipped 0.2, errors 0.25 vs 0.64: 0.64 (clipped)
    #                             V = -0.1 -> inside the range, both 1.21
    values = torch.tensor([[0.5, -0.1]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    returns = torch.ones(1, 2, dtype=torch.float64)
    loss, fraction = clipped_value_loss(values, old, returns, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-12)
    assert fraction == 0.5
    loss.backward()
    assert values.grad is not None
    # the clipped term is constant in V: no gradient on token 0; token 1: 0.5 * 2 (V - R) / 2
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.55], abs=1e-12)


def test_masked_whiten_has_zero_mean_and_unit_bessel_variance() -> None:
    values = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.float64)
    whitened = masked_whiten(values, mask)[mask.bool()]
    # kept: [1, 2, 3, 4]: mean 2.5, Bessel variance 5/3 (the mean's count + 1e-8 left out: 1e-7)
    expected = [(x - 2.5) / math.sqrt(5 / 3 + 1e-8) for x in (1, 2, 3, 4)]
    assert whitened.tolist() == pytest.approx(expected, abs=1e-7)


def test_targets_are_gae_of_the_critics_values(model_dir: str) -> None:
    trainer = _trainer(model_dir, PPO())
    assert trainer.critic is not None
    batch = collate(_rewarded(trainer), pad_id=0)
    targeted = trainer.critic.with_targets(batch)
    mask = batch.loss_mask
    with torch.no_grad():
        values = trainer.critic.values(batch) * mask
    advantages, returns = gae(outcome_rewards(batch.rewards, mask), values, mask, 1.0, 0.95)
    assert targeted.old_values is not None and targeted.returns is not None
    torch.testing.assert_close(targeted.old_values, values, atol=1e-6, rtol=0)
    torch.testing.assert_close(targeted.returns, returns, atol=1e-6, rtol=0)
    whitened = masked_whiten(advantages, mask) * mask
    torch.testing.assert_close(targeted.advantages, whitened, atol=1e-5, rtol=0)


def test_a_ppo_step_trains_the_critic_and_reports_it(model_dir: str) -> None:
    trainer = _trainer(model_dir, PPO(), lr=1e-3)
    assert trainer.critic is not None
    before = [p.detach().clone() for p in trainer.critic.model.parameters()]
    metrics = trainer.train_step(_rewarded(trainer))
    assert metrics["optimizer_steps"] == 4  # the preset: 2 epochs x 2 mini-batches
    assert metrics.extra["value_loss"] > 0
    moved = [
        not torch.equal(a, b)
        for a, b in zip(before, trainer.critic.model.parameters(), strict=True)
    ]
    assert all(moved)


def test_the_critic_resumes_from_the_state_bit_for_bit(model_dir: str, tmp_path: Path) -> None:
    original = _trainer(model_dir, PPO(), lr=1e-3)
    samples = _rewarded(original)
    original.train_step(samples)
    original.save_weights(str(tmp_path / "weights"))
    original.save_state(str(tmp_path / "state"))
    expected = original.train_step(samples)

    resumed = _trainer(model_dir, PPO(), lr=1e-3)
    resumed.load_weights(str(tmp_path / "weights"))
    resumed.load_state(str(tmp_path / "state"))
    got = resumed.train_step(samples)

    assert got["loss"] == expected["loss"]
    assert got.extra["value_loss"] == expected.extra["value_loss"]
    assert original.critic is not None and resumed.critic is not None
    for a, b in zip(
        original.critic.model.parameters(), resumed.critic.model.parameters(), strict=True
    ):
        assert torch.equal(a, b)
