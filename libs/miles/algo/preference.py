"""Preference losses on pairs of responses to one prompt: DPO.

Inputs are sequence log-likelihoods, ``[P]`` per pair: the sum over a response's tokens of
log p(token | prefix), under the policy (with gradient) and under the frozen reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceStats:
    chosen_reward: float
    """Mean implicit reward of the chosen responses, beta * log pi/pi_ref (DPO sec. 5)."""
    rejected_reward: float
    margin: float
    """Mean of chosen minus rejected implicit reward."""
    accuracy: float
    """Share of pairs whose chosen response has the larger implicit reward."""


def dpo(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, PreferenceStats]:
    """DPO's loss per pair (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), ``[P]``:

    ``h = beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)))``
    ``loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)``

    with ``eps = label_smoothing`` (conservative DPO, Mitchell 2023: the Bradley-Terry
    likelihood when a share eps of the labels is flipped; eps = 0 is eq. 7 itself).
    ``beta * log pi/pi_ref`` is the implicit reward of sec. 5, reported per side.
    """
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    margin = h.detach()
    stats = PreferenceStats(
        chosen_reward=float(chosen_reward.detach().mean().item()),
        rejected_reward=float(rejected_reward.detach().mean().item()),
        margin=float(margin.mean().item()),
        accuracy=float((margin > 0).float().mean().item()),
    )
    return loss, stats
