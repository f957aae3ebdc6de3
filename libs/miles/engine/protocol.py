"""The engine seam, shaped like SGLang's native HTTP API.

The request and response mirror SGLang's ``GenerateReqInput`` (``input_ids``,
``sampling_params``, ``rid``, ``return_logprob``) and its ``meta_info`` (``output_token_logprobs``,
``finish_reason``, ``weight_version``), and the control calls mirror ``/update_weights_from_disk``,
``/pause_generation``, ``/continue_generation`` and ``/health_generate``. An SGLang backend maps
these one-to-one onto HTTP; the transformers engine implements them in process.
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


class Engine(Protocol):
    """What the rollout service needs from an inference engine."""

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]: ...

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load safetensors (HF names) from ``model_path`` without restarting."""
        ...

    def pause_generation(self) -> None: ...

    def continue_generation(self) -> None: ...

    def weight_version(self) -> int: ...

    def health(self) -> bool: ...
