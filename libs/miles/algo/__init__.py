"""The RL layer as small pure components, each citing its paper and equation.

* ``advantages``: group-normalised (GRPO, Dr.GRPO), leave-one-out (RLOO), batch-whitened
  (REINFORCE++), GAE;
* ``policy_loss``: PPO's clip with dual-clip, GSPO's sequence ratio, CISPO's clipped IS weight;
* ``aggregation``: token-mean and the three sequence means;
* ``kl``: k1, k2, k3 and clamped k3, and the entropy bonus;
* ``correction``: TIS and MIS between engine and trainer logprobs;
* ``shaping``: DAPO's overlong punishment;
* ``batching``: which scored groups are kept and how they become a batch, with the advantages
  the configured algorithm asks for.
"""

from miles.algo.advantages import batch_whitened, gae, group_normalized, leave_one_out
from miles.algo.aggregation import Aggregation, aggregate, share
from miles.algo.correction import Mismatch, mismatch_weights
from miles.algo.kl import KLEstimator, entropy_from_logits, kl_estimate
from miles.algo.policy_loss import PolicyLossStats, cispo, gspo, ppo_clip
from miles.algo.shaping import overlong_penalty

__all__ = [
    "Aggregation",
    "KLEstimator",
    "Mismatch",
    "PolicyLossStats",
    "aggregate",
    "batch_whitened",
    "cispo",
    "entropy_from_logits",
    "gae",
    "group_normalized",
    "gspo",
    "kl_estimate",
    "leave_one_out",
    "mismatch_weights",
    "overlong_penalty",
    "ppo_clip",
    "share",
]
