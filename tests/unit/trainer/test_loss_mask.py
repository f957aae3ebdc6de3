"""A multi-turn sample's per-token loss mask, end to end on the torch backend: tool tokens are
inputs the policy conditions on, but they receive exactly zero gradient, and nothing the
engine reported for them (logprobs) or the trainer put on them (advantages) reaches the loss."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
import torch

from miles.algo.advantages import gae
from miles.algo.value import outcome_rewards
from miles.config import CISPO, GRPO, GSPO, PPO, DrGRPO, MismatchCorrection, ReinforcePP
from miles.config.algorithm import PolicyGradient
from miles.events import TrainSample
from miles.trainer import TorchTrainer, collate, token_logprobs
from miles.trainer.objective import policy_objective
from tests.unit.trainer.test_torch_backend import _trainer, _with_policy_logprobs

torch.set_num_threads(1)


def _sample(
    prompt: list[int], response: list[int], mask: list[int], advantage: float, reward: float
) -> TrainSample:
    return TrainSample(
        sample_id=f"s{prompt}",
        prompt_ids=prompt,
        response_ids=response,
        response_logprobs=[0.0] * len(response),
        advantage=advantage,
        reward=reward,
        policy_version=0,
        loss_mask=mask,
    )


# A model turn, a tool's output (masked), a second model turn; a trailing tool output; a
# single completion without a mask; and one whose tool output ends the response.
MULTI_TURN = [
    _sample([1, 2, 3], [4, 5, 6, 7, 8, 9], [1, 0, 0, 1, 1, 1], advantage=1.0, reward=1.0),
    _sample([6], [7, 8, 9, 10, 11], [1, 1, 0, 0, 0], advantage=-0.5, reward=0.0),
    _sample([12, 13], [14, 15], [], advantage=0.7, reward=1.0),
    _sample([2, 4], [1, 3, 5, 7], [1, 1, 0, 1], advantage=-1.2, reward=0.0),
]


def _on_policy(trainer: TorchTrainer, samples: list[TrainSample]) -> list[TrainSample]:
    """The engine's logprobs on the model's turns, 0.0 on the tool's (as a trajectory has)."""
    filled = _with_policy_logprobs(trainer, samples)
    return [
        msgspec.structs.replace(
            s,
            response_logprobs=[
                lp if trained else 0.0
                for lp, trained in zip(s.response_logprobs, s.loss_mask or [1] * 99, strict=False)
            ],
        )
        for s in filled
    ]


def test_collate_multiplies_the_response_span_by_the_per_token_mask() -> None:
    samples = [
        _sample([1, 2], [3, 4, 5, 6], [1, 0, 0, 1], advantage=1.0, reward=1.0),
        _sample([7], [8, 9], [], advantage=0.0, reward=0.0),
    ]
    samples[0].response_logprobs = [-0.1, -7.0, float("nan"), -0.4]  # a tool's: ignored
    batch = collate(samples, pad_id=0)
    # position t scores input_ids[t + 1]; the response starts at position len(prompt) - 1
    assert batch.loss_mask.tolist() == [[0, 1, 0, 0, 1], [1, 1, 0, 0, 0]]
    assert batch.engine_logprobs[0].tolist() == pytest.approx([0, -0.1, 0, 0, -0.4])
    assert batch.num_tokens == 4  # trained tokens only: every token-mean divides by these


def test_a_mask_of_the_wrong_length_is_a_clear_error() -> None:
    bad = _sample([1, 2], [3, 4, 5], [1, 0], advantage=1.0, reward=1.0)
    with pytest.raises(ValueError, match=r"s\[1, 2\]: loss_mask has 2 entries for 3 response"):
        collate([bad], pad_id=0)
    not_binary = msgspec.structs.replace(bad, loss_mask=[1, 2, 0])
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        collate([not_binary], pad_id=0)


ALGORITHMS = {
    "grpo+kl+entropy": GRPO(kl_coef=0.1, entropy_coef=0.01, old_logprobs="engine"),
    "grpo token_mean, tis per sequence": GRPO(
        aggregation="token_mean",
        old_logprobs="trainer",
        correction=MismatchCorrection(mode="tis", level="sequence"),
    ),
    "dr_grpo": DrGRPO(norm_tokens=8),
    "gspo": GSPO(),
    "cispo": CISPO(),
    "ppo with a critic, kl in the reward": PPO(kl_coef=0.1, kl_in="reward"),
    "reinforce_pp per-token returns": ReinforcePP(baseline=False, kl_coef=0.1, kl_in="reward"),
}


def _logit_gradients(trainer: TorchTrainer, samples: list[TrainSample]) -> torch.Tensor:
    """d loss / d logits ``[N, T, V]`` of the trainer's own backward (one micro-batch)."""
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        if output.requires_grad:  # the policy's forward, not pi_old's or the critic's
            output.retain_grad()
            captured.append(output)

    handle = trainer.model.lm_head.register_forward_hook(keep)  # type: ignore[union-attr]
    try:
        batch, _ = trainer._with_targets(collate(samples, pad_id=0))
        trainer._gradients(batch)
    finally:
        handle.remove()
    assert len(captured) == 1 and captured[0].grad is not None
    return captured[0].grad


def _trained_positions(samples: list[TrainSample], width: int) -> torch.Tensor:
    """``[N, width]``: 1 where a position predicts a token the sample's own mask trains."""
    mask = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        start = len(sample.prompt_ids) - 1
        response_mask = sample.loss_mask or [1] * len(sample.response_ids)
        mask[row, start : start + len(response_mask)] = torch.tensor(response_mask)
    return mask


@pytest.mark.parametrize("algorithm", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_masked_tokens_receive_exactly_zero_gradient(
    model_dir: str, algorithm: PolicyGradient
) -> None:
    trainer = _trainer(model_dir, algorithm, micro_batch_size=8)
    samples = _on_policy(trainer, MULTI_TURN)
    gradient = _logit_gradients(trainer, samples)[:, :-1]  # position t predicts token t + 1
    mask = _trained_positions(samples, gradient.shape[1])
    per_position = gradient.abs().amax(dim=-1)
    assert per_position[mask == 0].max().item() == 0.0  # exactly: tool, prompt and padding
    assert per_position[mask == 1].min().item() > 0.0  # every trained token learns

    # Masked is not ignored: the tool's tokens are inputs the later turn conditions on.
    changed = [msgspec.structs.replace(samples[0], response_ids=[4, 16, 17, 7, 8, 9])]
    other = _logit_gradients(trainer, changed + samples[1:])[:, :-1]
    assert not torch.equal(other[0, 5:], gradient[0, 5:])  # the second turn's predictions


def test_the_loss_ignores_logprobs_and_advantages_on_masked_tokens(model_dir: str) -> None:
    algorithm = GRPO(kl_coef=0.0, old_logprobs="engine", aggregation="token_mean")
    trainer = _trainer(model_dir, algorithm)
    batch = collate(_on_policy(trainer, MULTI_TURN), pad_id=0)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.loss_mask.shape, generator=generator)
    per_token = batch.advantages[:, None] * batch.loss_mask
    off = batch.loss_mask == 0
    baseline = dataclasses.replace(batch, advantages=per_token)
    perturbed = dataclasses.replace(
        batch,
        advantages=torch.where(off, 10 * noise, per_token),
        engine_logprobs=torch.where(off, -5 + noise, batch.engine_logprobs),
    )

    def loss_and_gradient(micro):  # type: ignore[no-untyped-def]
        trainer.model.zero_grad(set_to_none=True)
        objective = trainer._micro_batch_loss(micro, algorithm)
        objective.loss.backward()
        return objective.loss.item(), [p.grad.clone() for p in trainer.model.parameters()]

    loss, gradient = loss_and_gradient(baseline)
    same_loss, same_gradient = loss_and_gradient(perturbed)
    assert same_loss == loss
    assert all(torch.equal(a, b) for a, b in zip(gradient, same_gradient, strict=True))

    # What an engine reports for a token it did not sample never reaches a ratio: collate
    # zeroes it, so even a -inf or NaN there leaves the loss as it was.
    wild = [
        msgspec.structs.replace(
            s,
            response_logprobs=[
                lp if m else float("-inf")
                for lp, m in zip(s.response_logprobs, s.loss_mask or [1] * 99, strict=False)
            ],
        )
        for s in _on_policy(trainer, MULTI_TURN)
    ]
    wild_batch = collate(wild, pad_id=0)
    ones = policy_objective(*_logprobs(trainer, batch), batch, algorithm).loss
    assert policy_objective(*_logprobs(trainer, wild_batch), wild_batch, algorithm).loss == ones


def _logprobs(trainer: TorchTrainer, batch):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return token_logprobs(trainer.model, batch), None, None


def test_the_outcome_sits_on_the_last_trained_token_and_gae_skips_the_tool() -> None:
    """A response that ends with a tool's output: its reward belongs to the policy's last
    action (the last trained token), not to the environment's last token, where ``* mask``
    would erase it; GAE then carries it back over the tool's tokens."""
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 0]], dtype=torch.float64)
    rewards = outcome_rewards(torch.tensor([2.0], dtype=torch.float64), mask)
    assert rewards.tolist() == [[0, 0, 0, 0, 2, 0, 0]]
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[2, 0, 0, 2, 2, 0, 0]]
