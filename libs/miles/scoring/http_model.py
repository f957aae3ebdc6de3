"""A reward model behind HTTP: one POST per group, retried with backoff when it may succeed later.

The request (JSON, one entry per completion of the group, in order)::

    {"prompts": ["57+68=", ...], "completions": ["521", ...],
     "labels": ["521", ...], "metadata": [{"source": "gsm8k"}, ...]}

``labels`` and ``metadata`` are the dataset row's label and other columns. The answer is
``{"rewards": [0.93, ...]}``: one number per completion, same order (other keys are ignored).
``python -m miles.scoring.serve_reward_model`` is a server that answers it.

Connection errors, timeouts, 408, 429 and 5xx answers are retried ``retries`` times, waiting
``backoff_seconds`` and then twice as long before each next try: they say "not now", and 408
and 429 are the 4xx statuses that mean exactly that. Any other 4xx says the request is wrong, so
trying again would fail again: it fails the samples at once, as does an answer that is not the
format above. Each attempt is bounded by ``timeout_seconds`` and ``reward.timeout_seconds``,
whichever is shorter, and holds one of the ``reward.concurrency`` slots (not while it backs off).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from miles.config import HTTPRewardModel
from miles.events import Sample
from miles.scoring.functions import describe
from miles.scoring.limits import Failure, Limits, Outcome

RETRIED_4XX = frozenset({408, 429})
BODY_CHARS = 200
"""How much of an error answer's body the sample's error quotes."""


class RemoteError(Exception):
    """The model's server answered, and not with rewards: the message is the samples' error."""


def request_body(samples: Sequence[Sample]) -> dict[str, list[Any]]:
    return {
        "prompts": [sample.prompt for sample in samples],
        "completions": [sample.response_text for sample in samples],
        "labels": [sample.label for sample in samples],
        "metadata": [sample.metadata for sample in samples],
    }


def parse_rewards(body: bytes, expected: int) -> list[float]:
    """The ``rewards`` of an answer, checked: a list of ``expected`` numbers."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise RemoteError(f"answered {_quote(body)}, which is not JSON") from None
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list):
        raise RemoteError(f'answered {_quote(body)}, not {{"rewards": [...]}}')
    if len(rewards) != expected:
        raise RemoteError(f"answered {len(rewards)} rewards for {expected} completions")
    for reward in rewards:
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise RemoteError(f"answered a reward that is not a number: {reward!r:.{BODY_CHARS}}")
    return [float(reward) for reward in rewards]


class HTTPScorer:
    """A ``Scorer`` posting each group to ``config.url`` through one HTTP session."""

    def __init__(self, config: HTTPRewardModel) -> None:
        self.name = config.name
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def score(self, samples: Sequence[Sample], limits: Limits) -> list[Outcome]:
        try:
            payload = json.dumps(request_body(samples)).encode()
            rewards = await self._post(payload, len(samples), limits)
        except RemoteError as exc:
            return [Failure(f"{self.name}: {exc}")] * len(samples)
        except Exception as exc:  # noqa: BLE001 - e.g. a label JSON cannot encode
            return [Failure(describe(self.name, exc, limits.timeout))] * len(samples)
        return list(rewards)

    async def _post(self, payload: bytes, expected: int, limits: Limits) -> list[float]:
        attempts = self.config.retries + 1
        problem = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.config.backoff_seconds * 2 ** (attempt - 1))
            try:
                status, body = await limits.wait(self._request(payload))
            except TimeoutError:
                timeout = min(self.config.timeout_seconds, limits.timeout)
                problem = f"timed out after {timeout:g}s"
                continue
            except aiohttp.ClientConnectionError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= status < 300:
                return parse_rewards(body, expected)
            problem = f"HTTP {status}: {_quote(body)}"
            if not (status >= 500 or status in RETRIED_4XX):
                raise RemoteError(f"{self.config.url} answered {problem}")
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        raise RemoteError(f"no rewards from {self.config.url} after {tries}; last: {problem}")

    async def _request(self, payload: bytes) -> tuple[int, bytes]:
        if self._session is None:  # made here: a session belongs to the running event loop
            self._session = aiohttp.ClientSession(
                headers={"Content-Type": "application/json", **self.config.headers},
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
            )
        async with self._session.post(self.config.url, data=payload) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _quote(body: bytes) -> str:
    """The start of ``body`` as one line."""
    text = body[: 4 * BODY_CHARS].decode("utf-8", "replace")[:BODY_CHARS]
    return json.dumps(text) if text else "an empty body"
