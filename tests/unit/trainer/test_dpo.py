"""Offline DPO: the loss against eq. 7 written out, the pairs the coordinator feeds, the batch the
buffer makes of them, and the torch backend's step (it learns the preference, micro-batches
change nothing, a batch that is not pairs is refused, the reference survives a resume)."""

import json
import math
from pathlib import Path

import pytest
import torch

from miles.algo import dpo
from miles.algo.batching import make_batch, preference_signs
from miles.config import DPO, TrainerConfig, load_config
from miles.data import Preference, load_preferences
from miles.events import ScoredGroup, TrainSample
from miles.recipe import Recipe
from miles.runtime.subjects import Subjects
from miles.trainer import TorchTrainer, collate
from miles.trainer.batch import token_logprobs
from miles.trainer.preference import sequence_logprobs
from services.coordinator.sources import Pairs, preference_group

torch.set_num_threads(1)


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_is_eq_7_of_the_paper(smoothing: float) -> None:
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_c, ref_r = (
        -5 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4)
    )
    beta = 0.3
    loss, stats = dpo(chosen, rejected, ref_c, ref_r, beta, smoothing)
    for i in range(16):
        h = beta * ((chosen[i] - ref_c[i]) - (rejected[i] - ref_r[i])).item()
        sig = 1 / (1 + math.exp(-h))
        expected = -(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig)
        assert loss[i].item() == pytest.approx(expected, abs=1e-12)
    margins = beta * ((chosen - ref_c) - (rejected - ref_r))
    assert stats.margin == pytest.approx(margins.mean().item(), abs=1e-12)
    assert stats.accuracy == pytest.approx((margins > 0).double().mean().item(), abs=1e-12)
    assert stats.chosen_reward == pytest.approx((beta * (chosen - ref_c)).mean().item(), abs=1e-12)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen, rejected = _t([-2.0]).requires_grad_(), _t([-1.0]).requires_grad_()
    loss, _ = dpo(chosen, rejected, _t([-2.0]), _t([-1.0]), beta=0.5)
    loss.sum().backward()
    # at h = 0: d/dchosen = -beta * sigmoid(-h) = -0.25, d/drejected = +0.25
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() == pytest.approx(-0.25, abs=1e-12)
    assert rejected.grad.item() == pytest.approx(0.25, abs=1e-12)


# --- data and the coordinator's pairs ------------------------------------------------------------


def test_preference_rows_load_and_a_bad_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4"}]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    config = load_config(overrides=["algorithm.name=dpo", f"data.train_path='{path}'"])
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: a DPO row needs .*'rejected'"):
        load_preferences(config, Recipe(tmp_path, config, {}))
    path.write_text(json.dumps(rows[0]))
    assert load_preferences(config, Recipe(tmp_path, config, {})) == [Preference("1+1=", "2", "3")]


def _encode(text: str) -> list[int]:
    return [ord(c) - 40 for c in text]


def test_a_pair_is_a_scored_group_chosen_first_sent_to_the_buffer() -> None:
    pairs = Pairs(Subjects("run"), "run", [Preference("1+1=", "2", "31")], _encode, eos=[1])
    out = pairs.at(cursor=5, policy_version=3)
    assert out.subject == Subjects("run").scored
    assert out.msg_id == "scored/t5" and out.task_id == "t5"
    group = out.event
    assert isinstance(group, ScoredGroup) and group.policy_version == 3
    chosen, rejected = group.samples
    assert (chosen.reward, rejected.reward) == (1.0, 0.0)
    assert chosen.prompt_ids == rejected.prompt_ids == _encode("1+1=")
    assert chosen.response_ids == [*_encode("2"), 1]
    assert rejected.response_ids == [*_encode("31"), 1]
    assert len(rejected.response_logprobs) == 3


def test_the_buffer_batches_pairs_with_signs() -> None:
    groups = [
        preference_group("run", Preference(f"{i}+1=", "a", "b"), f"t{i}", 0, _encode, [1])
        for i in range(3)
    ]
    batch = make_batch("run", groups, DPO(), max_new_tokens=4)
    assert [s.advantage for s in batch.samples] == [1.0, -1.0] * 3
    assert [s.sample_id for s in batch.samples[:2]] == ["t0/chosen", "t0/rejected"]
    with pytest.raises(ValueError, match="chosen, rejected"):
        preference_signs(_t([0.0, 1.0]))


# --- the trainer --------------------------------------------------------------------------------


def _pairs(n: int) -> list[TrainSample]:
    """Prompt [2, 3 + i]; chosen answers 5, 6; rejected 7 (one token more on odd pairs)."""
    samples = []
    for i in range(n):
        prompt = [2, 3 + i % 4]
        for side, response, sign in (("c", [5, 6], 1.0), ("r", [7] * (1 + i % 2), -1.0)):
            samples.append(
                TrainSample(
                    sample_id=f"p{i}{side}",
                    prompt_ids=prompt,
                    response_ids=response,
                    response_logprobs=[0.0] * len(response),
                    advantage=sign,
                    reward=max(sign, 0.0),
                    policy_version=0,
                )
            )
    return samples


def _dpo_trainer(model_dir: str, micro_batch_size: int = 64, lr: float = 1e-3) -> TorchTrainer:
    config = TrainerConfig(threads=1, micro_batch_size=micro_batch_size, lr=lr)
    return TorchTrainer(model_dir, config, DPO(beta=0.5), seed=0)


def _margin(trainer: TorchTrainer, samples: list[TrainSample]) -> float:
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        seq = sequence_logprobs(token_logprobs(trainer.model, batch), batch.loss_mask)
    return float((seq[0::2] - seq[1::2]).mean())


def test_dpo_steps_learn_the_preference(model_dir: str) -> None:
    trainer = _dpo_trainer(model_dir)
    samples = _pairs(4)
    before = _margin(trainer, samples)
    first = trainer.train_step(samples)
    # the policy starts as its reference: h = 0, loss log 2, no pair ranked yet
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)
    assert first.extra["dpo_margin"] == pytest.approx(0.0, abs=1e-6)
    for _ in range(10):
        last = trainer.train_step(samples)
    assert last.loss < 0.5 * math.log(2)
    assert last.extra["dpo_accuracy"] == 1.0
    assert _margin(trainer, samples) > before + 1.0


def test_dpo_micro_batches_equal_one_batch(model_dir: str) -> None:
    samples = _pairs(6)
    whole, split = _dpo_trainer(model_dir, 64), _dpo_trainer(model_dir, micro_batch_size=3)
    whole.train_step(samples)
    split.train_step(samples)  # 3 rounds down to whole pairs: micro-batches of 2 rows
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_batch_that_is_not_pairs_is_refused(model_dir: str) -> None:
    samples = _pairs(2)
    samples[0], samples[1] = samples[1], samples[0]
    with pytest.raises(ValueError, match="trains on \\(chosen, rejected\\) pairs"):
        _dpo_trainer(model_dir).train_step(samples)


def test_the_reference_is_the_initial_policy_after_a_resume(model_dir: str, tmp_path: Path) -> None:
    trainer = _dpo_trainer(model_dir)
    samples = _pairs(4)
    trainer.train_step(samples)
    trainer.save_weights(str(tmp_path / "w"))
    trainer.save_state(str(tmp_path / "s"))
    expected = trainer.train_step(samples)

    resumed = _dpo_trainer(model_dir)
    resumed.load_weights(str(tmp_path / "w"))
    resumed.load_state(str(tmp_path / "s"))
    again = resumed.train_step(samples)
    assert again.loss == expected.loss
    assert again.extra == expected.extra


def test_rpo_adds_the_chosen_per_token_nll(model_dir: str) -> None:
    config = TrainerConfig(threads=1, micro_batch_size=64, lr=1e-3)
    trainer = TorchTrainer(model_dir, config, DPO(beta=0.5, nll_coef=0.7), seed=0)
    samples = _pairs(4)
    batch = collate(samples, pad_id=0)
    with torch.no_grad():
        seq = sequence_logprobs(token_logprobs(trainer.model, batch), batch.loss_mask)
    nll = (-seq[0::2] / batch.loss_mask[0::2].sum(dim=-1)).mean().item()
    metrics = trainer.train_step(samples)
    assert metrics.extra["dpo_chosen_nll"] == pytest.approx(nll, abs=1e-6)
    assert metrics.loss == pytest.approx(math.log(2) + 0.7 * nll, abs=1e-6)
