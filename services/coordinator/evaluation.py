"""Held-out evaluation rounds (pure: steps, results and times in, decisions out).

A round evaluates the policy of one step: one greedy task per held-out prompt, scored, reduced
to accuracy. Rounds are due at the start, every ``coordinator.eval_every`` steps and after the
last step. A round is written to the run record once: when its last result arrives, or when
``coordinator.eval_timeout_seconds`` pass first (then with the results it has), because an eval
task lost for good (dead-lettered, dropped as oversized) must not hold the run forever.
``evaluator.py`` does the I/O around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from miles import events
from miles.data import Prompt
from miles.runtime.run_record import EvalExample, EvalResult

EXAMPLES = 8
"""Held-out completions an evaluation round keeps for the trackers' tables."""


@dataclass
class EvalRound:
    round: int
    task_ids: frozenset[str]
    deadline: float = float("inf")
    """Clock time after which the round is recorded with the results it has."""
    rewards: dict[str, float] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)
    versions: set[int] = field(default_factory=set)
    examples: dict[int, EvalExample] = field(default_factory=dict)
    """The first ``EXAMPLES`` prompts' completions, by their index in the held-out set."""
    recorded: bool = False

    @property
    def complete(self) -> bool:
        return self.recorded or len(self.rewards) >= len(self.task_ids)


class EvalRounds:
    """Every round of this run by the step it follows, and which of them are still open."""

    def __init__(
        self,
        eval_every: int,
        last_step: int,
        timeout_seconds: float,
        correct_reward: float,
        recorded: Iterable[int] = (),
    ) -> None:
        self.eval_every = eval_every
        self.last_step = last_step
        self.timeout_seconds = timeout_seconds
        self.correct_reward = correct_reward
        self.rounds = {r: EvalRound(r, frozenset(), recorded=True) for r in recorded}
        """Rounds a previous coordinator recorded are not run again."""

    def missing(self, step: int) -> bool:
        """No round after ``step`` yet: the policy a (re)started coordinator begins from."""
        return step not in self.rounds

    def due(self, step: int) -> bool:
        """A round after committed ``step``: every ``eval_every`` steps and after the last."""
        scheduled = step % self.eval_every == 0 or step == self.last_step
        return scheduled and step <= self.last_step and self.missing(step)

    def start(self, round_: int, task_ids: Iterable[str], now: float) -> EvalRound:
        started = EvalRound(round_, frozenset(task_ids), deadline=now + self.timeout_seconds)
        self.rounds[round_] = started
        return started

    def record(self, group: events.ScoredGroup) -> EvalRound | None:
        """Count one scored eval group; the round it completes, handed out once to be written.

        A result of a round this coordinator did not start (a previous coordinator's: this one
        re-runs it) or of a round already written (a late result after the timeout) is ignored.
        """
        current = self.rounds.get(group.eval_round)
        if current is None or current.recorded or group.task_id not in current.task_ids:
            return None
        sample = group.samples[0]
        current.rewards[group.task_id] = sample.reward
        current.correct[group.task_id] = not sample.failed and sample.reward >= self.correct_reward
        current.versions.add(sample.policy_version_first)
        index = prompt_index(group.task_id)
        if index is not None and index < EXAMPLES:
            current.examples[index] = EvalExample(
                prompt=sample.prompt,
                completion=sample.response_text,
                label=str(sample.label),
                reward=sample.reward,
            )
        if not current.complete:
            return None
        current.recorded = True
        return current

    def overdue(self, now: float) -> list[EvalRound]:
        """Rounds past their deadline, handed out once to be written partial."""
        late = [r for r in self.rounds.values() if not r.recorded and now > r.deadline]
        for round_ in late:
            round_.recorded = True
        return late

    @property
    def complete(self) -> bool:
        return all(r.complete for r in self.rounds.values())

    def pending(self, step: int) -> int | None:
        """The step of the oldest round still to be evaluated, with ``step`` committed: one
        waiting for results, or the one due after ``step`` but not started yet (the step's
        notice may arrive after the counter moved). None: the policy is not being measured."""
        waiting = [r.round for r in self.rounds.values() if not r.complete]
        if self.due(step):
            waiting.append(step)
        return min(waiting, default=None)


def eval_tasks(run_id: str, round_: int, prompts: list[Prompt], instance: str) -> list[events.Task]:
    """One greedy task per held-out prompt, asking for at least version ``round_``.

    Task ids carry this coordinator's instance, so a restarted coordinator's round is not
    swallowed by the dedupe window as a repeat of the round its predecessor started.
    """
    return [
        events.Task(
            run_id=run_id,
            policy_version=round_,
            task_id=f"eval{round_}-{index}-{instance}",
            prompt=prompt.prompt,
            label=prompt.label,
            metadata=prompt.metadata,
            messages=prompt.messages,
            split="eval",
            group_size=1,
            greedy=True,
            eval_round=round_,
        )
        for index, prompt in enumerate(prompts)
    ]


def prompt_index(task_id: str) -> int | None:
    """The held-out prompt an eval task asked about: ``eval<round>-<index>-<instance>``."""
    parts = task_id.split("-")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def summarize(done: EvalRound, time: float) -> EvalResult:
    """The round's accuracy over the results that arrived (``n`` of ``expected``), at wall
    clock ``time``."""
    n = len(done.rewards)
    return EvalResult(
        round=done.round,
        after_step=done.round,
        policy_versions=sorted(done.versions),
        accuracy=sum(done.correct.values()) / n if n else 0.0,
        reward_mean=sum(done.rewards.values()) / n if n else 0.0,
        n=n,
        expected=len(done.task_ids),
        time=time,
        examples=[done.examples[i] for i in sorted(done.examples)],
    )
