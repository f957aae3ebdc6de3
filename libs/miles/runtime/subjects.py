"""Run-scoped subject names, stream names and durable consumer names.

Every subject lives under ``miles.<run_id>.`` so several runs share one NATS account without
seeing each other's traffic. One stream holds one kind of work so that WorkQueue retention
(each message consumed once, by one consumer) applies where the work is a queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return run_id


@dataclass(frozen=True)
class Subjects:
    run_id: str

    @property
    def root(self) -> str:
        return f"miles.{self.run_id}"

    @property
    def tasks(self) -> str:
        return f"{self.root}.tasks"

    @property
    def generated(self) -> str:
        return f"{self.root}.samples.generated"

    @property
    def scored(self) -> str:
        return f"{self.root}.samples.scored"

    @property
    def eval_scored(self) -> str:
        return f"{self.root}.eval.scored"

    @property
    def batches(self) -> str:
        return f"{self.root}.batches"

    @property
    def weights(self) -> str:
        return f"{self.root}.weights"

    @property
    def steps(self) -> str:
        return f"{self.root}.steps"

    @property
    def filtered(self) -> str:
        return f"{self.root}.groups.filtered"

    @property
    def engines(self) -> str:
        """Engine health announcements (stragglers): core NATS, for whoever watches."""
        return f"{self.root}.engines"

    def control(self, command: str = "*") -> str:
        return f"{self.root}.control.{command}"

    def heartbeat(self, service: str = "*", instance: str = "*") -> str:
        return f"{self.root}.heartbeat.{service}.{instance}"

    def dead(self, service: str = "*") -> str:
        return f"{self.root}.dead.{service}"

    def stream(self, kind: str) -> str:
        """JetStream stream names may not contain dots; one stream per kind of work."""
        return f"MILES_{self.run_id}_{kind.upper()}"


# Durable consumer names: every replica of a service binds the same one, so the fleet scales by
# starting more processes and JetStream spreads the work.
ROLLOUT_CONSUMER = "rollout"
REWARD_CONSUMER = "reward"
BUFFER_CONSUMER = "buffer"
TRAINER_CONSUMER = "trainer"
COORDINATOR_CONSUMER = "coordinator"
