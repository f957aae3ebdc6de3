"""The KL as a per-token reward penalty (``algorithm.kl_in = "reward"``) on the torch backend:
the penalty is that of pi_old against the frozen reference, it reaches the critic's targets
(PPO) or REINFORCE++'s per-token returns, and it leaves the loss."""

import pytest
import torch

from miles.algo import kl_estimate, kl_penalized_rewards, reinforce_pp_returns
from miles.algo.value import outcome_rewards
from miles.config import PPO, ReinforcePP
from miles.trainer import collate
from miles.trainer.batch import token_logprobs
from miles.trainer.objective import policy_objective
from tests.unit.trainer.test_ppo_critic import _rewarded
from tests.unit.trainer.test_torch_backend import _trainer

torch.set_num_threads(1)


def _moved(model_dir: str, algorithm):  # type: ignore[no-untyped-def]
    """A trainer one step away from its reference, and a rewarded batch."""
    trainer = _trainer(model_dir, algorithm, lr=1e-2)
    trainer.train_step(_rewarded(trainer))
    return trainer, collate(_rewarded(trainer), pad_id=0)


def _expected_rewards(trainer, batch, coef: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logprobs = token_logprobs(trainer.model, batch)
        ref = token_logprobs(trainer.reference, batch)
    mask = batch.loss_mask
    return (outcome_rewards(batch.rewards, mask) - coef * kl_estimate(logprobs, ref, "k3")) * mask


def test_reinforce_pp_returns_carry_the_kl_penalty(model_dir: str) -> None:
    algorithm = ReinforcePP(baseline=False, kl_coef=0.1, kl_in="reward", old_logprobs="trainer")
    trainer, batch = _moved(model_dir, algorithm)
    targeted, metrics = trainer._with_targets(batch)
    expected = _expected_rewards(trainer, batch, 0.1)
    assert targeted.token_rewards is not None
    assert torch.allclose(targeted.token_rewards, expected, atol=1e-6)
    assert metrics["kl"] > 0  # the policy moved: the penalty is not zero
    assert torch.allclose(
        targeted.advantages, reinforce_pp_returns(expected, batch.loss_mask), atol=1e-5
    )


def test_ppo_critic_targets_carry_the_kl_penalty(model_dir: str) -> None:
    algorithm = PPO(kl_coef=0.1, kl_in="reward", old_logprobs="trainer")
    trainer, batch = _moved(model_dir, algorithm)
    targeted, _ = trainer._with_targets(batch)
    expected = _expected_rewards(trainer, batch, 0.1)
    assert targeted.token_rewards is not None
    assert torch.allclose(targeted.token_rewards, expected, atol=1e-6)
    # with gamma = lam = 1 the return at the first response token is the sum of its rewards
    loose = PPO(kl_coef=0.1, kl_in="reward", old_logprobs="trainer", lam=1.0)
    trainer, batch = _moved(model_dir, loose)
    targeted, _ = trainer._with_targets(batch)
    assert targeted.returns is not None and targeted.token_rewards is not None
    first = batch.loss_mask.argmax(dim=-1)
    rows = torch.arange(batch.num_samples)
    summed = targeted.token_rewards.sum(dim=-1)
    assert torch.allclose(targeted.returns[rows, first], summed, atol=1e-5)


def test_the_kl_in_the_reward_is_not_in_the_loss(model_dir: str) -> None:
    algorithm = ReinforcePP(baseline=False, kl_coef=5.0, kl_in="reward", old_logprobs="trainer")
    trainer, batch = _moved(model_dir, algorithm)
    targeted, _ = trainer._with_targets(batch)
    with torch.no_grad():
        logprobs = token_logprobs(trainer.model, targeted)
        alone = policy_objective(logprobs, None, None, targeted, algorithm)
        objective = trainer._micro_batch_loss(targeted, algorithm)
    assert objective.kl == 0.0
    assert objective.loss.item() == pytest.approx(alone.loss.item(), abs=1e-7)
    metrics = trainer.train_step(_rewarded(trainer))
    assert metrics.kl is not None and metrics.kl > 0  # reported from the penalty instead


def test_kl_penalized_rewards_without_a_reference_change_nothing() -> None:
    mask = torch.ones(1, 3)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    out = kl_penalized_rewards(rewards, logprobs, logprobs, mask, 0.5, "k3")
    assert torch.equal(out, rewards)
