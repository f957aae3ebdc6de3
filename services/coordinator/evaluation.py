"""Held-out evaluation: greedy generation of the eval prompts, scored, reduced to accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from miles import events, telemetry
from miles.data import Prompt
from miles.runtime.service import ServiceContext


@dataclass
class EvalRound:
    round: int
    task_ids: set[str]
    rewards: dict[str, float] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)
    versions: set[int] = field(default_factory=set)
    recorded: bool = False
    deadline: float = float("inf")
    """Monotonic time after which the round is recorded with the results it has: an eval task
    lost for good (dead-lettered, dropped as oversized) must not hold the run forever."""

    @property
    def complete(self) -> bool:
        return self.recorded or len(self.rewards) >= len(self.task_ids)

    @property
    def overdue(self) -> bool:
        return not self.recorded and time.monotonic() > self.deadline

    @classmethod
    def recorded_round(cls, round_: int) -> EvalRound:
        """A round a previous coordinator finished and recorded: not run again."""
        return cls(round_, set(), recorded=True)


async def recorded(ctx: ServiceContext) -> set[int]:
    """Rounds whose result is in the run record already."""
    return {int(row["round"]) for row in await ctx.store.evals()}


async def dispatch_eval(ctx: ServiceContext, round_: int, prompts: list[Prompt]) -> EvalRound:
    """Publish one greedy task per held-out prompt, asking for at least version ``round_``.

    Task ids carry this coordinator's instance, so a restarted coordinator's round is not
    swallowed by the dedupe window as a repeat of the round its predecessor started.
    """
    task_ids = set()
    for index, prompt in enumerate(prompts):
        task = events.Task(
            run_id=ctx.run_id,
            policy_version=round_,
            task_id=f"eval{round_}-{index}-{ctx.instance}",
            prompt=prompt.prompt,
            label=prompt.label,
            split="eval",
            group_size=1,
            greedy=True,
            eval_round=round_,
        )
        with telemetry.root_span("dispatch", {"miles.task_id": task.task_id}):
            await ctx.bus.publish(ctx.subjects.tasks, task, msg_id=task.task_id)
        task_ids.add(task.task_id)
    deadline = time.monotonic() + ctx.config.coordinator.eval_timeout_seconds
    return EvalRound(round_, task_ids, deadline=deadline)


def record_result(
    rounds: dict[int, EvalRound], group: events.ScoredGroup, threshold: float
) -> None:
    current = rounds.get(group.eval_round)
    if current is None or group.task_id not in current.task_ids:
        return  # a round a previous coordinator started: this one re-runs it
    sample = group.samples[0]
    current.rewards[group.task_id] = sample.reward
    current.correct[group.task_id] = not sample.failed and sample.reward >= threshold
    current.versions.add(sample.policy_version_first)


def summarize(done: EvalRound) -> dict[str, object]:
    """The round's accuracy over the results that arrived (``n`` of ``expected``)."""
    n = len(done.rewards)
    return {
        "round": done.round,
        "after_step": done.round,
        "policy_versions": sorted(done.versions),
        "accuracy": sum(done.correct.values()) / n if n else 0.0,
        "reward_mean": sum(done.rewards.values()) / n if n else 0.0,
        "n": n,
        "expected": len(done.task_ids),
        "time": time.time(),
    }
