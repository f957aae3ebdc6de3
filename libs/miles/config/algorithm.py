"""The RL algorithm, as one typed config section: ``algorithm.name`` picks a preset.

Each preset is a class whose fields default to its paper's choices; every field can still be
set. The presets are data: the buffer asks the preset for its advantage estimator and reward
shaping, the trainer for its policy loss, aggregation, KL and correction, and no service branches
on the name. Switching ``algorithm.name`` (``--set algorithm.name=rloo``) starts from that
preset's defaults; other keys set alongside it apply on top.

The components the fields name live in ``miles.algo`` with their equations.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, TypeAlias

from pydantic import Field, model_validator

from miles.config.section import Section

Aggregation: TypeAlias = Literal[
    "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
]
"""How per-token losses become one number (``miles.algo.aggregation``)."""
KLEstimator: TypeAlias = Literal["k1", "k2", "k3", "k3_clamped"]
AdvantageName: TypeAlias = Literal["group", "rloo", "reinforce_pp", "gae", "pair"]
PolicyLossName: TypeAlias = Literal["ppo_clip", "gspo", "cispo", "dpo"]
StdName: TypeAlias = Literal["population", "bessel", "none"]


class MismatchCorrection(Section):
    """Importance correction between the engine that sampled and the trainer's policy.

    Engines and trainers compute different logprobs for the same tokens (other kernels, other
    batching, bf16), so on-policy samples are slightly off-policy. ``tis`` multiplies each
    token's loss by ``min(w, cap)`` with ``w = pi_trainer / pi_engine`` (truncated importance
    sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"); ``mis`` drops the tokens (or sequences) whose ``w`` leaves ``[1/cap, cap]``
    (masked importance sampling). ``sequence`` uses the product of a sequence's token ratios.
    """

    mode: Literal["off", "tis", "mis"] = Field("off", description="off, tis or mis.")
    level: Literal["token", "sequence"] = Field("token", description="token or sequence.")
    cap: float = Field(2.0, gt=1, description="Truncation (tis) or rejection (mis) threshold.")


class PolicyGradient(Section):
    """What every preset shares: the clipped surrogate, KL, entropy, updates per batch."""

    eps_low: float = Field(
        0.2, ge=0, description="Lower clip of the importance ratio: 1 - eps_low."
    )
    eps_high: float = Field(
        0.2, ge=0, description="Upper clip of the importance ratio: 1 + eps_high."
    )
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="Dual-clip constant c (Ye et al. 2020, arXiv:1912.09729): for A < 0 the "
        "loss is at most c * |A|, so a huge ratio cannot blow it up. None: off.",
    )
    aggregation: Aggregation = Field(
        "token_mean",
        description="token_mean (DAPO), seq_mean_token_mean (GRPO), seq_mean_token_sum "
        "(REINFORCE, RLOO), seq_mean_token_sum_norm (Dr.GRPO: divided by a constant).",
    )
    norm_tokens: int | None = Field(
        None,
        ge=1,
        description="The constant of seq_mean_token_sum_norm; None: rollout.max_new_tokens.",
    )
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL-to-reference loss term.")
    kl_estimator: KLEstimator = Field(
        "k3", description="k1, k2, k3 or k3_clamped (Schulman 2020, 'Approximating KL')."
    )
    kl_in: Literal["loss", "reward"] = Field(
        "loss",
        description="Where the KL to the reference goes: a loss term, or a per-token reward "
        "penalty before the advantage (ppo; reinforce_pp without its baseline).",
    )
    entropy_coef: float = Field(
        0.0, ge=0, description="Weight of the entropy bonus (subtracted from the loss)."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch.")
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps per pass: the batch split into this many parts."
    )
    old_logprobs: Literal["auto", "trainer", "engine"] = Field(
        "auto",
        description="pi_old of the ratio. trainer: the trainer's own logprobs before the "
        "batch's first update (as verl recomputes them), exact on-policy and independent of "
        "how engines batched; engine: the sampling engine's logprobs, which importance-correct "
        "stale samples. auto: trainer when buffer.max_staleness is 0, else engine.",
    )
    correction: MismatchCorrection = Field(default_factory=MismatchCorrection)

    # What the preset is made of. A preset whose paper fixes one narrows its type to that
    # value, so setting another is refused with the allowed one named.
    advantage: AdvantageName = "group"
    policy_loss: PolicyLossName = "ppo_clip"
    std: StdName = "population"

    @property
    def updates_per_batch(self) -> int:
        return self.ppo_epochs * self.mini_batches

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer keeps a frozen copy of the initial policy."""
        return self.kl_coef > 0

    @property
    def token_advantages(self) -> bool:
        """Whether the trainer builds per-token advantages, so a per-token KL penalty can reach
        them (GAE here; REINFORCE++ without its group baseline overrides this)."""
        return self.advantage == "gae"

    @model_validator(mode="after")
    def _kl_reward_needs_token_advantages(self) -> PolicyGradient:
        if self.kl_in == "reward" and not self.token_advantages:
            raise ValueError(
                "algorithm.kl_in = 'reward' needs per-token advantages: algorithm.name = 'ppo', "
                "or 'reinforce_pp' with algorithm.baseline = false; use kl_in = 'loss' here"
            )
        return self

    @model_validator(mode="after")
    def _correction_needs_trainer_old(self) -> PolicyGradient:
        if self.correction.mode != "off" and self.old_logprobs == "engine":
            raise ValueError(
                "algorithm.correction corrects from the engine's to the trainer's logprobs: "
                "it needs algorithm.old_logprobs = 'trainer' or 'auto', not 'engine'"
            )
        return self


class GRPO(PolicyGradient):
    """GRPO (Shao et al. 2024, arXiv:2402.03300): group-normalised outcome advantages and
    PPO's clipped surrogate, the per-sequence mean then the mean over sequences (eq. 3), and a
    k3 KL term to the reference with beta = 0.04 (sec. 4.2)."""

    name: Literal["grpo"] = "grpo"
    std: Literal["population", "bessel"] = Field(
        "population",
        description="The group std: population (divide by G, unit variance within the group) "
        "or bessel (G - 1, as verl and TRL do: every advantage times sqrt(G / (G - 1))).",
    )
    aggregation: Aggregation = "seq_mean_token_mean"
    kl_coef: float = Field(0.04, ge=0, description="GRPO's beta (sec. 4.2).")


class DrGRPO(PolicyGradient):
    """Dr.GRPO (Liu et al. 2025, arXiv:2503.20783, sec. 3.1): GRPO without its two biases, the
    division by the group std (no ``std``) and by each response's length (a token sum divided
    by one constant for every sequence), and no KL term."""

    name: Literal["dr_grpo"] = "dr_grpo"
    std: Literal["none"] = "none"
    aggregation: Aggregation = "seq_mean_token_sum_norm"


class DAPO(PolicyGradient):
    """DAPO (Yu et al. 2025, arXiv:2503.14476): clip-higher (eps_high = 0.28, sec. 3.1),
    token-level mean (sec. 3.3), no KL (sec. 2.3), the soft overlong punishment (sec. 3.4,
    eq. 13) and dynamic sampling (sec. 3.2: ``buffer.filter_zero_variance`` with
    ``buffer.max_filter_rounds``)."""

    name: Literal["dapo"] = "dapo"
    std: Literal["population", "bessel"] = "population"
    eps_high: float = Field(0.28, ge=0, description="Clip-higher (sec. 3.1).")
    overlong_cache: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="L_cache as a share of rollout.max_new_tokens (the paper: 4096 of 20480): "
        "a response longer than max - L_cache loses up to overlong_penalty linearly. 0: off.",
    )
    overlong_penalty: float = Field(1.0, ge=0, description="The punishment at the full length.")


class GSPO(PolicyGradient):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): the importance ratio of a whole sequence,
    the geometric mean of its token ratios (eq. 7), clipped in a narrow range (sec. 5.1: 3e-4
    and 4e-4) and averaged per sequence, with GRPO's group advantages."""

    name: Literal["gspo"] = "gspo"
    policy_loss: Literal["gspo"] = "gspo"
    std: Literal["population", "bessel"] = "population"
    eps_low: float = Field(3e-4, ge=0, description="GSPO's left clip (sec. 5.1).")
    eps_high: float = Field(4e-4, ge=0, description="GSPO's right clip (sec. 5.1).")
    aggregation: Aggregation = "seq_mean_token_mean"


class CISPO(PolicyGradient):
    """CISPO (MiniMax 2025, arXiv:2506.13585, eq. 4): REINFORCE weighted by the clipped
    importance ratio under a stop-gradient, so no token's gradient is ever dropped. The paper
    sets no lower bound (eps_low = 1 here, the ratio is never below 0) and tunes eps_high
    without publishing it; 0.28 is DAPO's."""

    name: Literal["cispo"] = "cispo"
    policy_loss: Literal["cispo"] = "cispo"
    std: Literal["population", "bessel"] = "population"
    eps_low: float = Field(1.0, ge=0, description="1: no lower bound (eq. 5).")
    eps_high: float = Field(0.28, ge=0, description="Upper bound of the IS weight.")


class RLOO(PolicyGradient):
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740, sec. 3.2, after Kool et al. 2019): each
    sample's baseline is the mean reward of the other G - 1 of its group, and the whole
    response is one action (a token sum per sequence)."""

    name: Literal["rloo"] = "rloo"
    advantage: Literal["rloo"] = "rloo"
    std: Literal["none"] = "none"
    aggregation: Aggregation = "seq_mean_token_sum"


class ReinforcePP(PolicyGradient):
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): no critic and no per-group std; advantages
    whitened over the whole batch (sec. 3.2), token-weighted as verl computes it. ``baseline``
    subtracts the group mean first (the paper's REINFORCE++-baseline, for group sampling)."""

    name: Literal["reinforce_pp"] = "reinforce_pp"
    advantage: Literal["reinforce_pp"] = "reinforce_pp"
    std: Literal["none"] = "none"
    baseline: bool = Field(True, description="Subtract the group mean before whitening.")

    @property
    def token_advantages(self) -> bool:
        """Without the baseline the trainer can whiten per-token returns (``kl_in="reward"``);
        the group mean needs whole groups, which only the buffer sees."""
        return not self.baseline


class PPO(PolicyGradient):
    """PPO with a critic (Schulman et al. 2017, arXiv:1707.06347), as RLHF runs it (Ouyang et
    al. 2022, arXiv:2203.02155): a value model of the policy's architecture with a scalar head
    estimates each response token's value; GAE (arXiv:1506.02438, eq. 16) with gamma = 1 and
    lambda = 0.95 turns the outcome reward into per-token advantages, whitened over the batch;
    the critic regresses the returns with a clipped value loss (verl's and OpenAI baselines')."""

    name: Literal["ppo"] = "ppo"
    advantage: Literal["gae"] = "gae"
    std: Literal["none"] = "none"
    ppo_epochs: int = Field(2, ge=1, description="Passes over each batch.")
    mini_batches: int = Field(2, ge=1, description="Optimizer steps per pass.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda.")
    value_clip: float = Field(
        0.2, gt=0, description="A new value estimate moves at most this far from the old one."
    )
    critic_lr: float | None = Field(None, ge=0, description="None: trainer.lr.")
    critic_path: str | None = Field(
        None,
        description="An HF model directory to initialise the critic from (its head is new); "
        "None: the policy's model.path.",
    )


class DPO(Section):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), offline: a preference dataset of
    ``{prompt, chosen, rejected}`` rows trains the policy against a frozen reference (the
    initial policy) with ``-log sigmoid(beta * (log pi/pi_ref (chosen) - log pi/pi_ref
    (rejected)))``. The coordinator feeds the pairs to the buffer, scored (chosen 1, rejected 0);
    rollout and reward only serve the held-out evaluation. ``label_smoothing`` is conservative
    DPO (Mitchell 2023, "A note on DPO with noisy preferences"): eps of the labels flipped.

    No clipped surrogate, KL term or entropy bonus: the constants below are what the buffer
    and trainer read of every preset, fixed (setting one is refused as an unknown field).
    """

    name: Literal["dpo"] = "dpo"
    beta: float = Field(
        0.1, gt=0, description="The KL strength beta of eq. 7 (the paper uses 0.1 to 0.5)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="cDPO's share of preference labels assumed flipped."
    )
    nll_coef: float = Field(
        0.0,
        ge=0,
        description="Weight of the chosen response's per-token negative log-likelihood added "
        "to the loss (RPO, Pang et al. 2024, arXiv:2404.19733, eq. 1; TRL's rpo_alpha): keeps "
        "the chosen likelihood from falling with the rejected one. 0: plain DPO.",
    )

    advantage: ClassVar[AdvantageName] = "pair"
    policy_loss: ClassVar[PolicyLossName] = "dpo"
    std: ClassVar[StdName] = "none"
    aggregation: ClassVar[Aggregation] = "seq_mean_token_sum"
    norm_tokens: ClassVar[int | None] = None
    kl_coef: ClassVar[float] = 0.0
    entropy_coef: ClassVar[float] = 0.0
    ppo_epochs: ClassVar[int] = 1
    mini_batches: ClassVar[int] = 1
    updates_per_batch: ClassVar[int] = 1
    old_logprobs: ClassVar[Literal["auto", "trainer", "engine"]] = "trainer"
    kl_in: ClassVar[Literal["loss", "reward"]] = "loss"
    needs_reference: ClassVar[bool] = True


Algorithm: TypeAlias = Annotated[
    GRPO | DrGRPO | DAPO | GSPO | CISPO | RLOO | ReinforcePP | PPO | DPO,
    Field(discriminator="name"),
]
ALGORITHMS: tuple[str, ...] = (
    "grpo",
    "dr_grpo",
    "dapo",
    "gspo",
    "cispo",
    "rloo",
    "reinforce_pp",
    "ppo",
    "dpo",
)
