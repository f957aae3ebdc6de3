"""The RL layer as small pure components, each citing its paper and equation.

* ``advantages``: group-normalised (GRPO, Dr.GRPO), leave-one-out (RLOO), batch-whitened
  (REINFORCE++, also from per-token returns), GAE;
* ``policy_loss``: PPO's clip with dual-clip, GSPO's sequence ratio, CISPO's clipped IS weight;
* ``aggregation``: token-mean and the three sequence means;
* ``kl``: k1, k2, k3 and clamped k3 (a loss term, or a per-token reward penalty), and the
  entropy bonus;
* ``correction``: TIS and MIS between engine and trainer logprobs;
* ``preference``: DPO's loss on pairs of responses;
* ``shaping``: DAPO's overlong punishment;
* ``batching``: which scored groups are kept and how they become a batch, with the advantages
  the configured algorithm asks for.
"""

from miles.algo.advantages import (
    batch_whitened,
    gae,
    group_normalized,
    leave_one_out,
    reinforce_pp_returns,
)
from miles.algo.aggregation import Aggregation, aggregate, share
from miles.algo.correction import Mismatch, mismatch_weights
from miles.algo.kl import KLEstimator, entropy_from_logits, kl_estimate, kl_penalized_rewards
from miles.algo.policy_loss import PolicyLossStats, cispo, gspo, ppo_clip
from miles.algo.preference import PreferenceStats, dpo
from miles.algo.shaping import overlong_penalty

__all__ = [
    "Aggregation",
    "KLEstimator",
    "Mismatch",
    "PolicyLossStats",
    "PreferenceStats",
    "aggregate",
    "batch_whitened",
    "cispo",
    "dpo",
    "entropy_from_logits",
    "gae",
    "group_normalized",
    "gspo",
    "kl_estimate",
    "kl_penalized_rewards",
    "leave_one_out",
    "mismatch_weights",
    "overlong_penalty",
    "ppo_clip",
    "reinforce_pp_returns",
    "share",
]
