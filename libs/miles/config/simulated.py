"""``rollout.simulated`` and ``trainer.simulated``: compute that takes time without using the CPU.

For measuring miles' own orchestration (``benchmarks/bench_pipeline.py``) and for tests: an
engine that "generates" at a set rate per request, with response lengths drawn from a lognormal
distribution, and a trainer that takes a set time per step. Both sleep instead of computing, so
a thousand engines fit in one rollout process and the CPU left is the control plane's.
"""

from __future__ import annotations

from pydantic import Field

from miles.config.section import Section


class SimulatedEngineConfig(Section):
    """``rollout.engine = "simulated"``: each engine lives in the rollout process."""

    tokens_per_second: float = Field(
        50.0,
        gt=0,
        description="Decode rate of one request; an engine runs every request of a batch at "
        "once (continuous batching), so a batch takes its longest response / this.",
    )
    length_mean: float = Field(
        64.0,
        gt=0,
        description="Mean response length in tokens (lognormal), before the cap at "
        "rollout.max_new_tokens.",
    )
    length_sigma: float = Field(
        0.6,
        ge=0,
        description="sigma of the lengths' underlying normal (0: every response is "
        "length_mean tokens). RL response lengths are right-skewed: 0.5-1.0.",
    )
    prefill_seconds: float = Field(
        0.0, ge=0, description="Added once to every batch (prompt processing, scheduling)."
    )
    load_seconds: float = Field(
        0.0, ge=0, description="Time one weight update takes (update_weights_from_disk)."
    )


class SimulatedTrainerConfig(Section):
    """``trainer.backend = "simulated"``: a tiny deterministic state, sleeps for its steps."""

    seconds_per_step: float = Field(1.0, ge=0, description="Fixed time of one train_step.")
    seconds_per_sample: float = Field(
        0.0, ge=0, description="Added per sample of the batch (forward/backward scales)."
    )
    save_seconds: float = Field(
        0.0, ge=0, description="Time save_weights takes on top of writing its tiny file."
    )
