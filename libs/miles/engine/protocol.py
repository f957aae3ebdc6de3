"""The engine seam, shaped like SGLang's native HTTP API: what the rollout drives.

The request and response mirror SGLang's ``GenerateReqInput`` (``input_ids``,
``sampling_params``, ``rid``, ``return_logprob``) and its ``meta_info`` (``output_token_logprobs``,
``finish_reason``, ``weight_version``), and the control calls mirror ``/update_weights_from_disk``,
``/pause_generation``, ``/continue_generation``, ``/get_model_info`` and ``/health_generate``.

``EngineClient`` has two implementations, checked by one contract suite
(``tests/contract/test_engine_client.py``): ``SGLangClient`` speaks the API over HTTP to a server
process (real SGLang, or miles' CPU stand-in ``sglang_server``), and ``InProcessClient`` serves it
from a ``TransformersEngine`` in the caller's process.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True):
    """A subset of SGLang's ``SamplingParams`` with the same names and meanings."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = []
    stop_token_ids: list[int] = []
    sampling_seed: int | None = None
    """Per-request seed: the same request on the same weights yields the same tokens."""


class GenerateRequest(msgspec.Struct, kw_only=True):
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = True


class GenerateOutput(msgspec.Struct, kw_only=True):
    rid: str
    output_ids: list[int]
    text: str
    output_token_logprobs: list[float]
    """log p(token | prefix) under the sampling distribution's model, one per output token."""
    finish_reason: Literal["stop", "length", "abort"]
    weight_version: int
    prompt_tokens: int
    completion_tokens: int


class EngineClient(Protocol):
    """One inference engine as the rollout drives it; every call is a coroutine."""

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """One batch; the outputs come back in the order of ``requests``."""
        ...

    async def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load safetensors (Hugging Face names) from ``model_path`` without restarting."""
        ...

    async def pause_generation(self) -> None:
        """Requests sent from now on wait for ``continue_generation``; a batch already running
        may be answered with ``finish_reason == "abort"`` (SGLang's default mode)."""
        ...

    async def continue_generation(self) -> None: ...

    async def weight_version(self) -> int:
        """The version label of the weights the engine holds."""
        ...

    async def health(self) -> bool:
        """The engine generates a token; ``False`` (never an exception) when it cannot."""
        ...

    async def aclose(self) -> None:
        """Release the client's connections or threads (the engine itself lives on)."""
        ...
