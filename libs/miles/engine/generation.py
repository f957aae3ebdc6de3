"""Turning a task into samples: the engine handle a rollout function receives, and the default.

A custom ``@miles.rollout`` gets the same ``EngineHandle`` and returns ``list[Sample]``; it can
call ``engine.generate`` as many times as it likes (multi-turn, tools, self-correction), most
simply through ``engine.trajectory(task, index, config)`` (``miles.engine.trajectory``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from miles.config import RolloutConfig
from miles.engine.protocol import EngineClient, GenerateOutput, GenerateRequest, SamplingParams
from miles.events import Sample, Task

if TYPE_CHECKING:  # transformers is slow to import, and ``import miles`` should not pay for it
    from transformers import PreTrainedTokenizerBase

    from miles.engine.trajectory import Trajectory


class EngineReset(RuntimeError):
    """The engine answered with older weights than it was given: it restarted in between."""


class EngineHandle:
    """One engine as a rollout function sees it: async ``generate`` plus the tokenizer.

    ``client`` is the engine's ``EngineClient`` (in the rollout service, an ``SGLangClient``
    speaking to the engine's own server process). ``weight_version`` is the version the engine
    was given: an output under an older one means the engine restarted in between. The handle
    counts the tokens it generated and the seconds it was generating (calls that overlap, as
    concurrent rollouts' do, count their wall time once), the fleet's throughput signal.
    """

    def __init__(
        self,
        client: EngineClient,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        weight_version: int,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.name = name
        self.weight_version = weight_version
        self.tokens = 0
        self.seconds = 0.0
        self.calls = 0
        """Calls in flight."""
        self._busy_since = 0.0

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        if not self.calls:
            self._busy_since = time.monotonic()
        self.calls += 1
        try:
            outputs = await self.client.generate(requests)
        finally:
            self.calls -= 1
            if not self.calls:
                self.seconds += time.monotonic() - self._busy_since
        self.tokens += sum(len(o.output_ids) for o in outputs)
        stale = [o.weight_version for o in outputs if o.weight_version < self.weight_version]
        if stale:
            raise EngineReset(
                f"{self.name} generated at version {min(stale)}, but was given "
                f"{self.weight_version}: it restarted with the base model"
            )
        return outputs

    def trajectory(
        self,
        task: Task,
        index: int,
        config: RolloutConfig,
        max_response_tokens: int | None = None,
    ) -> Trajectory:
        """Sample ``index`` of ``task`` as a multi-turn trajectory on this engine
        (``miles.engine.trajectory``: model turns trained, tool turns masked)."""
        from miles.engine.trajectory import Trajectory  # it builds on this module

        return Trajectory(self, task, index, config, max_response_tokens)


RolloutFn = Callable[[EngineHandle, Task, RolloutConfig], Awaitable[list[Sample]]]


def sample_seed(task: Task, index: int) -> int:
    """A seed per sample, stable across retries, so a redelivered task regenerates the same.

    It depends on the run's seed (through ``task.seed``), not on the run id: two runs of one
    config sample the same tokens, which is what lets a faulted run be compared bit for bit.
    """
    digest = hashlib.sha256(f"{task.task_id}/{task.seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sampling_for(task: Task, index: int, config: RolloutConfig) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=config.max_new_tokens,
        temperature=0.0 if task.greedy else config.temperature,
        top_p=1.0 if task.greedy else config.top_p,
        stop=list(config.stop),
        sampling_seed=sample_seed(task, index),
    )


def to_sample(task: Task, index: int, prompt_ids: list[int], output: GenerateOutput) -> Sample:
    return Sample(
        sample_id=f"{task.task_id}/{index}",
        prompt=task.prompt,
        label=task.label,
        metadata=task.metadata,
        prompt_ids=prompt_ids,
        response_ids=output.output_ids,
        response_logprobs=output.output_token_logprobs,
        response_text=output.text,
        finish_reason=output.finish_reason,
        policy_version_first=output.weight_version,
        policy_version_last=output.weight_version,
    )


async def default_rollout(engine: EngineHandle, task: Task, config: RolloutConfig) -> list[Sample]:
    """One prompt, ``group_size`` independent completions."""
    return (await rollout_many(engine, [task], config))[0]


async def rollout_many(
    engine: EngineHandle, tasks: list[Task], config: RolloutConfig
) -> list[list[Sample]]:
    """The default rollout for several tasks in one engine call: one batch keeps a CPU busy."""
    requests: list[GenerateRequest] = []
    prompts: list[list[int]] = []
    for task in tasks:
        prompt_ids = list(engine.tokenizer.encode(task.prompt, add_special_tokens=False))
        prompts.append(prompt_ids)
        count = 1 if task.greedy else task.group_size
        requests += [
            GenerateRequest(
                rid=f"{task.task_id}/{i}",
                input_ids=prompt_ids,
                sampling_params=sampling_for(task, i, config),
            )
            for i in range(count)
        ]
    outputs = iter(await engine.generate(requests))
    return [
        [
            to_sample(task, i, prompt_ids, next(outputs))
            for i in range(1 if task.greedy else task.group_size)
        ]
        for task, prompt_ids in zip(tasks, prompts, strict=True)
    ]
