"""Where the trainer stands, and what training the next batch writes: pure decisions.

``ResumeState`` comes from the latest committed manifest (nothing yet: step 0) and moves with
every commit. ``StepPlan`` is the next step: its number, whether its full state is due
(``trainer.checkpoint_every``) and the names its files take in the blob store.
"""

from __future__ import annotations

from dataclasses import dataclass

from miles.runtime.checkpoint import Manifest


@dataclass(frozen=True)
class FullState:
    """Optimizer moments and RNG after ``step``, in the blob store (``sha256`` of the backend's
    ``state_file``)."""

    uri: str
    sha256: str
    step: int


@dataclass(frozen=True)
class ResumeState:
    """The committed step whose weights the actor holds, and the latest full state at or before
    it (None before the first): what the next manifest carries over when no state is due."""

    step: int = 0
    full_state: FullState | None = None

    @classmethod
    def of(cls, latest: Manifest | None) -> ResumeState:
        if latest is None:
            return cls()
        full_state = None
        if latest.state_uri and latest.state_sha256:
            full_state = FullState(latest.state_uri, latest.state_sha256, latest.state_step)
        return cls(latest.step, full_state)

    @property
    def moments_behind(self) -> int:
        """Steps between the full state and the weights: a resume from here continues with
        optimizer moments this many steps old (0 only resumes bit for bit)."""
        return self.step - (self.full_state.step if self.full_state else 0)

    def plan(self, checkpoint_every: int, attempt: str) -> StepPlan:
        step = self.step + 1
        return StepPlan(step, attempt, state_due=step % checkpoint_every == 0)


@dataclass(frozen=True)
class StepPlan:
    """Training one batch from step ``step - 1``; ``attempt`` is unique per try, so a crashed
    attempt's files never overwrite what a committed manifest names."""

    step: int
    attempt: str
    state_due: bool
    """Write the full state too: every ``trainer.checkpoint_every`` steps."""

    @property
    def weights_staging(self) -> str:
        """Under the run's ``staging/``: where the actor writes before the blob store moves it."""
        return f"v{self.step}-{self.attempt}"

    @property
    def weights_name(self) -> str:
        return f"weights/v{self.step}-{self.attempt}"

    @property
    def state_staging(self) -> str:
        return f"state{self.step}-{self.attempt}"

    @property
    def state_name(self) -> str:
        return f"state/s{self.step}-{self.attempt}"
