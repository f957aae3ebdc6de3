"""The evaluation rounds' I/O: publishes a round's greedy tasks, writes finished rounds to the run
record (the decisions are ``evaluation.py``'s)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from miles import events, telemetry
from miles.config import MilesConfig
from miles.data import Prompt
from miles.runtime.bus import Bus
from miles.runtime.run_record import RunStorePort
from services.coordinator.evaluation import EvalRound, EvalRounds, eval_tasks, summarize

log = logging.getLogger("miles.coordinator")


class Evaluator:
    def __init__(
        self,
        bus: Bus,
        store: RunStorePort,
        rounds: EvalRounds,
        prompts: list[Prompt],
        instance: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus, self.store = bus, store
        self.rounds = rounds
        self.prompts = prompts
        self.instance = instance
        self.clock = clock

    @classmethod
    async def resume(
        cls,
        bus: Bus,
        store: RunStorePort,
        config: MilesConfig,
        prompts: list[Prompt],
        instance: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> Evaluator:
        """With the rounds whose result is in the run record already."""
        settings = config.coordinator
        rounds = EvalRounds(
            settings.eval_every,
            config.run.steps,
            settings.eval_timeout_seconds,
            settings.correct_reward,
            recorded={result.round for result in await store.evals()},
        )
        return cls(bus, store, rounds, prompts, instance, clock)

    @property
    def enabled(self) -> bool:
        """A run without held-out data (``data.eval_path`` unset) is never evaluated."""
        return bool(self.prompts)

    @property
    def complete(self) -> bool:
        return self.rounds.complete or not self.enabled

    def pending(self, step: int) -> int | None:
        return self.rounds.pending(step) if self.enabled else None

    async def begin(self, step: int) -> None:
        """Evaluate the policy this coordinator starts from, unless that round is recorded."""
        if self.enabled and self.rounds.missing(step):
            await self._dispatch(step)

    async def after_step(self, step: int) -> None:
        if self.enabled and self.rounds.due(step):
            await self._dispatch(step)

    async def on_result(self, group: events.ScoredGroup) -> None:
        done = self.rounds.record(group)
        if done is not None:
            await self._write(done)

    async def write_overdue(self) -> None:
        for late in self.rounds.overdue(self.clock()):
            log.warning(
                "eval after step %d: %d of %d results after %.0fs; recording it partial",
                late.round,
                len(late.rewards),
                len(late.task_ids),
                self.rounds.timeout_seconds,
            )
            await self._write(late)

    async def _dispatch(self, round_: int) -> None:
        tasks = eval_tasks(self.bus.run_id, round_, self.prompts, self.instance)
        for task in tasks:
            with telemetry.root_span("dispatch", {"miles.task_id": task.task_id}):
                await self.bus.publish(self.bus.subjects.tasks, task, msg_id=task.task_id)
        self.rounds.start(round_, [task.task_id for task in tasks], now=self.clock())

    async def _write(self, done: EvalRound) -> None:
        result = summarize(done, time.time())
        await self.store.add_eval(result)
        await self.store.update(accuracy=result.accuracy, eval_step=done.round)
        log.info("eval after step %d: accuracy %.3f", done.round, result.accuracy)
