"""A multi-turn sample as a custom rollout builds it: the policy's turns and the environment's.

    @miles.rollout
    async def solve(engine, task, config):
        async def play(index):
            trajectory = engine.trajectory(task, index, config)
            if (await trajectory.generate()).endswith("?"):     # the model calls the tool
                trajectory.append(calculator(task.prompt), role="tool")
                await trajectory.generate()                     # and answers
            return trajectory.sample()

        count = 1 if task.greedy else task.group_size
        return list(await asyncio.gather(*(play(i) for i in range(count))))

The sample's response is every token after the prompt, turn after turn. A model turn is the
engine's own token ids and logprobs, never re-tokenized: decoding and encoding again can split
the text differently from how the policy sampled it, and the trainer would then score tokens the
policy never chose. An environment turn (a tool's output, a user's reply, a chat template's
role header) is tokenized once, carries logprob 0.0 and ``loss_mask`` 0: it conditions the
model's later turns but the loss never trains it. Each model turn continues from the prompt and
everything appended so far, so the trainer scores it on exactly the context the engine saw.

Length: each model turn may write up to ``rollout.max_new_tokens`` tokens (or the
``max_new_tokens`` given to ``generate``), so a sample of ``k`` model turns may be up to ``k``
times longer than a single completion. ``max_response_tokens`` bounds the whole response, model
and environment tokens together (what the model's context and the trainer's memory must hold):
a model turn gets at most what is left, an environment turn is cut to it, and ``generate`` on a
full trajectory returns ``""`` without calling the engine and ends the sample with
``finish_reason = "length"``, as a single completion that ran out of tokens.

Sampling: turn 0 uses the seed of ``sampling_for`` (a one-turn trajectory generates what the
default rollout does, token for token); turn ``k`` a seed derived from it and ``k``, so a
redelivered task regenerates the same sample and two turns do not share one random stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from miles.config import RolloutConfig
from miles.engine.generation import sample_seed, sampling_for
from miles.engine.protocol import GenerateOutput, GenerateRequest
from miles.events import FinishReason, Sample, Task, Turn

if TYPE_CHECKING:
    from miles.engine.generation import EngineHandle

ASSISTANT = "assistant"
"""The role of the policy's own turns: the only ones the loss trains."""


class Trajectory:
    """One sample of ``task`` (its ``index``-th), built turn by turn; ``sample()`` ends it."""

    def __init__(
        self,
        engine: EngineHandle,
        task: Task,
        index: int,
        config: RolloutConfig,
        max_response_tokens: int | None = None,
    ) -> None:
        if max_response_tokens is not None and max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be at least 1, not {max_response_tokens}")
        self.engine = engine
        self.task = task
        self.index = index
        self.config = config
        self.max_response_tokens = max_response_tokens
        self.prompt_ids: list[int] = list(
            engine.tokenizer.encode(task.prompt, add_special_tokens=False)
        )
        self.response_ids: list[int] = []
        self.response_logprobs: list[float] = []
        self.loss_mask: list[int] = []
        self.turns: list[Turn] = []
        self.finish_reason: FinishReason = "stop"
        self.policy_versions: list[int] = []
        """The weight version of each model turn, in order."""

    @property
    def remaining(self) -> int | None:
        """Response tokens left under ``max_response_tokens`` (None: no bound)."""
        if self.max_response_tokens is None:
            return None
        return max(self.max_response_tokens - len(self.response_ids), 0)

    @property
    def model_turns(self) -> int:
        return sum(turn.trained for turn in self.turns)

    async def generate(self, **sampling: object) -> str:
        """The model's next turn, appended and trained; returns its text.

        ``sampling`` overrides the rollout's ``SamplingParams`` for this turn (``stop``,
        ``stop_token_ids``, ``max_new_tokens``, ``temperature``...).
        """
        return (await Trajectory.generate_all([self], **sampling))[0]

    @staticmethod
    async def generate_all(trajectories: Sequence[Trajectory], **sampling: object) -> list[str]:
        """The next model turn of each trajectory, in one engine call (one batch keeps a CPU
        engine busy where one call per trajectory would queue); their texts in order."""
        if not trajectories:
            return []
        engine = trajectories[0].engine
        if any(t.engine is not engine for t in trajectories):
            raise ValueError("generate_all batches trajectories of one engine only")
        requests = [t._next_request(sampling) for t in trajectories]
        live = [r for r in requests if r is not None]
        outputs = iter(await engine.generate(live) if live else [])
        return [
            t._take(next(outputs)) if r is not None else ""
            for t, r in zip(trajectories, requests, strict=True)
        ]

    def append(self, content: str | Sequence[int], role: str = "tool") -> list[int]:
        """Environment tokens after the last turn, kept out of the loss; returns their ids.

        Text is tokenized without special tokens; pass ids to control the tokenization (a chat
        template's role header, say). Cut to what ``max_response_tokens`` leaves.
        """
        if isinstance(content, str):
            ids = list(self.engine.tokenizer.encode(content, add_special_tokens=False))
        else:
            ids = list(content)
        remaining = self.remaining
        cut = remaining is not None and len(ids) > remaining
        if cut:
            ids = ids[:remaining]
        if isinstance(content, str) and not cut:
            text = content
        else:
            text = str(self.engine.tokenizer.decode(ids))
        self._extend(ids, [0.0] * len(ids), role, trained=False, text=text)
        return ids

    def sample(self) -> Sample:
        """The finished sample: its turns, per-token loss mask and every model turn's version."""
        if not self.policy_versions:
            raise ValueError(f"{self.sample_id}: a sample needs at least one model turn")
        return Sample(
            sample_id=self.sample_id,
            prompt=self.task.prompt,
            label=self.task.label,
            metadata=self.task.metadata,
            prompt_ids=self.prompt_ids,
            response_ids=list(self.response_ids),
            response_logprobs=list(self.response_logprobs),
            response_text="".join(turn.text for turn in self.turns),
            finish_reason=self.finish_reason,
            policy_version_first=self.policy_versions[0],
            policy_version_last=self.policy_versions[-1],
            loss_mask=list(self.loss_mask),
            turns=list(self.turns),
        )

    @property
    def sample_id(self) -> str:
        return f"{self.task.task_id}/{self.index}"

    def _next_request(self, overrides: dict[str, object]) -> GenerateRequest | None:
        """The request of the next model turn; None when no token is left (then it ends)."""
        params = sampling_for(self.task, self.index, self.config)
        turn = self.model_turns
        if turn > 0:
            params = msgspec.structs.replace(params, sampling_seed=self._turn_seed(turn))
        params = msgspec.structs.replace(params, **overrides)
        remaining = self.remaining
        if remaining is not None:
            if remaining == 0:
                self.finish_reason = "length"
                return None
            params = msgspec.structs.replace(
                params, max_new_tokens=min(params.max_new_tokens, remaining)
            )
        rid = self.sample_id if turn == 0 else f"{self.sample_id}/{turn}"
        return GenerateRequest(
            rid=rid, input_ids=self.prompt_ids + self.response_ids, sampling_params=params
        )

    def _take(self, output: GenerateOutput) -> str:
        if len(output.output_token_logprobs) != len(output.output_ids):
            raise ValueError(
                f"{output.rid}: {len(output.output_ids)} tokens but "
                f"{len(output.output_token_logprobs)} logprobs (the engine must return them)"
            )
        self._extend(output.output_ids, output.output_token_logprobs, ASSISTANT, True, output.text)
        self.finish_reason = output.finish_reason
        self.policy_versions.append(output.weight_version)
        return output.text

    def _turn_seed(self, turn: int) -> int:
        base = sample_seed(self.task, self.index)
        digest = hashlib.sha256(f"{base}/turn/{turn}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def _extend(
        self, ids: list[int], logprobs: list[float], role: str, trained: bool, text: str
    ) -> None:
        start = len(self.response_ids)
        self.response_ids += ids
        self.response_logprobs += logprobs
        self.loss_mask += [int(trained)] * len(ids)
        end = len(self.response_ids)
        self.turns.append(Turn(role=role, start=start, end=end, trained=trained, text=text))
