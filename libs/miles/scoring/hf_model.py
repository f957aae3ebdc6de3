"""A Hugging Face sequence-classification reward model, held by a Ray actor of the reward service.

``SequenceClassifier`` scores (prompt, completion) pairs: the text is the prompt followed by the
completion (or, with ``chat_template``, the tokenizer's rendering of a user turn and the
completion as the assistant's), and the reward is the first logit, as for the reward models
TRL's ``RewardTrainer`` trains (``num_labels=1``). Pairs longer than ``max_length`` tokens lose
the start of their prompt: the completion is what is being judged.

Pairs are padded on the right: every pair's tokens keep the positions they would have alone
and the attention mask hides the padding, so a reward does not depend on what else was in the
batch (left padding would move them, which absolute position embeddings such as GPT-2's see).
Hugging Face's classifiers pool each row's last non-padding token (decoder-only models, given
``pad_token_id``) or its first (encoders), wherever the padding is.

``HFScorer`` holds one actor per reward-service process. Calls wait for the model to load (up
to ``load_timeout_seconds``), then each is bounded by ``reward.timeout_seconds``. Ray restarts a
dead actor (``max_restarts``), which loads the model again; a call its death interrupted runs
again once it has (scoring is a pure function of the pairs). An actor that cannot load the
model fails every call's samples with the exception its ``__init__`` raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from miles.config import HFRewardModel
from miles.events import Sample
from miles.models import local_dir
from miles.scoring.functions import describe
from miles.scoring.limits import Failure, Limits, Outcome

RESTART_POLL_SECONDS = 0.5


class SequenceClassifier:
    """The model and its tokenizer, loaded from a local directory (or the local hub cache)."""

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int = 1024,
        chat_template: bool = False,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.device = torch.device(device)
        directory = str(local_dir(path, "the reward model's path"))  # or a cached hub id's
        local = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, **local)
        self.tokenizer.truncation_side = "left"  # keep the completion
        self.tokenizer.padding_side = "right"  # see the module's docstring
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(directory, **local, dtype="auto")
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:  # how a decoder-only classifier finds each row's end
            text_config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()

    def ready(self) -> bool:
        """Answered once ``__init__`` has loaded the model: what the scorer waits for."""
        return True

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        if not self.chat_template:
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        return [
            str(  # tokenize=False: the rendered text
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                    tokenize=False,
                )
            )
            for p, c in zip(prompts, completions, strict=True)
        ]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The first logit for each (prompt, completion), ``batch_size`` pairs per forward."""
        texts = self.texts(prompts, completions)
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                # A rendered chat template already holds the model's special tokens.
                add_special_tokens=not self.chat_template,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**batch).logits
            rewards.extend(logits[:, 0].float().tolist())
        return rewards


class NotLoaded(Exception):
    """The actor did not load its model within ``load_timeout_seconds``."""


class HFScorer:
    """A ``Scorer`` whose rewards come from a ``SequenceClassifier`` on a Ray actor."""

    def __init__(self, config: HFRewardModel) -> None:
        self.name = config.name
        self.config = config
        self.actor: Any = (
            ray.remote(SequenceClassifier)
            .options(
                num_cpus=config.num_cpus,
                num_gpus=config.num_gpus,
                max_restarts=config.max_restarts,
                # ``score`` runs again a call the actor's death interrupted, once the model is
                # loaded again; Ray's retry would wait for the reload under the call's timeout.
                max_task_retries=0,
            )
            .remote(
                str(config.path),
                batch_size=config.batch_size,
                max_length=config.max_length,
                chat_template=config.chat_template,
                device="cuda" if config.num_gpus > 0 else "cpu",
                trust_remote_code=config.trust_remote_code,
            )
        )
        self._loaded: asyncio.Future[None] | None = None

    async def score(self, samples: Sequence[Sample], limits: Limits) -> list[Outcome]:
        prompts = [sample.prompt for sample in samples]
        completions = [sample.response_text for sample in samples]
        try:
            try:
                values = await self._call(limits, prompts, completions)
            except RayActorError:  # restarted under the call: scoring is pure, run it again
                values = await self._call(limits, prompts, completions)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the samples
            return [Failure(self._describe(exc, limits.timeout))] * len(samples)
        return list(values)

    async def _call(self, limits: Limits, prompts: list[str], completions: list[str]) -> Any:
        await self._wait_loaded()
        ref = self.actor.score.remote(prompts, completions)
        try:
            return await limits.wait(ref)
        except TimeoutError:
            # A sync actor runs one call at a time: drop this one if it is still queued, so
            # the calls behind it do not wait for work nobody will read.
            ray.cancel(ref)
            raise
        except RayActorError:
            self._loaded = None  # restarting: the next call waits for the model to load again
            raise

    async def _wait_loaded(self) -> None:
        """Wait (once, shared by concurrent calls) for the actor to have loaded the model."""
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(self._until_loaded())
        try:
            await asyncio.shield(self._loaded)
        except Exception:
            self._loaded = None  # the next call tries again
            raise

    async def _until_loaded(self) -> None:
        """Ask the actor until it answers: while Ray restarts it, a call fails at once."""
        deadline = time.monotonic() + self.config.load_timeout_seconds
        while True:
            try:
                remaining = max(deadline - time.monotonic(), 0.0)
                await asyncio.wait_for(self.actor.ready.remote(), remaining)
                return
            except ActorUnavailableError:
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(RESTART_POLL_SECONDS)
            except TimeoutError:
                break
        raise NotLoaded(
            f"{self.name}: the model was not loaded within "
            f"{self.config.load_timeout_seconds:g}s (load_timeout_seconds)"
        )

    def _describe(self, exc: BaseException, timeout: float) -> str:
        if isinstance(exc, NotLoaded):
            return str(exc)
        if isinstance(exc, RayActorError):
            lines = [line for line in str(exc).splitlines() if line.strip()]
            # A failed __init__ ends its message with the exception it raised.
            reason = lines[-1] if exc.actor_init_failed else lines[0]
            return f"{self.name}: its Ray actor died: {reason.strip()}"
        if isinstance(exc, RayTaskError):  # raised in the actor: the cause, not Ray's traceback
            exc = exc.cause
        return describe(self.name, exc, timeout).splitlines()[0]

    async def close(self) -> None:
        ray.kill(self.actor, no_restart=True)
