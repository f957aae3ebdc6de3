"""An async client for SGLang's native HTTP API: the engine seam, spoken over the network.

``SGLangClient`` implements ``protocol.EngineClient`` over HTTP, plus SGLang's other weight
paths (a process group the trainer broadcasts into; serialized tensors), ``flush_cache`` and
``abort``. It drives a real ``sglang.launch_server`` and the CPU stand-in in ``sglang_server``.

Names, defaults and response shapes were read (names only, no code) from sgl-project/sglang:

- ``python/sglang/srt/managers/io_struct.py`` @ 001067fffe33: ``GenerateReqInput`` (batched
  ``input_ids``/``rid``/``sampling_params`` lists, ``return_logprob``), ``AbortReq``,
  ``UpdateWeightFromDiskReqInput``, ``InitWeightsUpdateGroupReqInput``,
  ``UpdateWeightsFromDistributedReqInput``, ``UpdateWeightsFromTensorReqInput`` (base64 over
  HTTP), ``DestroyWeightsUpdateGroupReqInput``, ``PauseGenerationReqInput`` (``mode``, default
  ``abort``), ``ContinueGenerationReqInput``. ``weight_version`` is a string there; miles keeps
  integers and parses them back.
- ``python/sglang/srt/entrypoints/http_server.py`` @ 0025436eab05: the routes; control routes
  answer ``{"success", "message"}`` with HTTP 400 on failure; a refused ``/generate`` answers
  ``{"error": {"message"}}``; ``/get_model_info`` carries ``weight_version``.
- ``python/sglang/srt/sampling/sampling_params.py`` @ 00c17cafcb9e: ``max_new_tokens``,
  ``temperature``, ``top_p``, ``top_k`` (-1: all), ``stop``, ``stop_token_ids``,
  ``no_stop_trim``, ``sampling_seed``; an unknown key is an error there.
- ``python/sglang/srt/managers/tokenizer_manager.py``, ``schedule_batch.py`` (excerpts): a result
  is ``{"text", "output_ids", "meta_info"}``; ``meta_info`` has ``id``, ``finish_reason``
  (``{"type": "stop" | "length" | "abort", ...}``), ``prompt_tokens``, ``completion_tokens``,
  ``weight_version`` and, with ``return_logprob``, ``output_token_logprobs`` as
  ``[logprob, token_id, text or null]``.

Only calls safe to repeat (reads, pause/continue, abort, flush, loads from disk or tensors) are
retried, on connection errors only, with bounded exponential backoff. ``generate`` and the
process-group calls are sent once: a repeated group call would wait for a rendezvous or a
broadcast the trainer will not make again.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
import torch
import torch.distributed as dist

from miles.engine.protocol import GenerateOutput, GenerateRequest

log = logging.getLogger(__name__)

PauseMode = Literal["abort", "retract", "in_place"]
BODY_EXCERPT_CHARS = 600
T = TypeVar("T")


class SGLangError(RuntimeError):
    """The server's answer cannot be used (an unexpected shape, a non-integer version)."""


class SGLangHTTPError(SGLangError):
    """The server answered with an error status (or ``success: false``)."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        excerpt = body[:BODY_EXCERPT_CHARS].decode(errors="replace")
        super().__init__(f"{method} {url} -> HTTP {status}: {excerpt}")


class SGLangConnectionError(SGLangError, ConnectionError):
    """The server could not be reached, or did not answer in time."""


# --- request bodies: only fields SGLang defines, under SGLang's names -------------------------


class _SamplingParamsBody(msgspec.Struct, omit_defaults=True):
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    stop_token_ids: list[int]
    no_stop_trim: bool  # sent always (omit_defaults would drop a default): SGLang's is False
    sampling_seed: int | None = None


class _GenerateBody(msgspec.Struct):
    input_ids: list[list[int]]
    sampling_params: list[_SamplingParamsBody]
    rid: list[str]
    return_logprob: list[bool]


# --- response bodies: the fields miles reads; msgspec ignores the rest -------------------------


class _FinishReason(msgspec.Struct):
    type: Literal["stop", "length", "abort"]


class _MetaInfo(msgspec.Struct):
    id: str
    finish_reason: _FinishReason
    prompt_tokens: int
    completion_tokens: int
    weight_version: str | int | None = None
    output_token_logprobs: list[tuple[float, int, str | None]] = []


class _GenerateResult(msgspec.Struct):
    text: str
    output_ids: list[int]
    meta_info: _MetaInfo


class _ModelInfo(msgspec.Struct):
    weight_version: str | int | None = None


class _Success(msgspec.Struct):
    success: bool
    message: str = ""


def parse_weight_version(value: str | int | None) -> int:
    """SGLang's string version as the integer miles uses; anything else is a clear error."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SGLangError(
            f"weight_version {value!r} is not an integer: start the server with "
            "--weight-version <int> (SGLangServerProcess does)"
        ) from None


def _to_output(result: _GenerateResult, request: GenerateRequest) -> GenerateOutput:
    meta = result.meta_info
    logprobs = [logprob for logprob, _, _ in meta.output_token_logprobs]
    if (
        request.return_logprob
        and [t for _, t, _ in meta.output_token_logprobs] != result.output_ids
    ):
        raise SGLangError(f"request {meta.id}: output_token_logprobs do not match output_ids")
    return GenerateOutput(
        rid=meta.id,
        output_ids=result.output_ids,
        text=result.text,
        output_token_logprobs=logprobs,
        finish_reason=meta.finish_reason.type,
        weight_version=parse_weight_version(meta.weight_version),
        prompt_tokens=meta.prompt_tokens,
        completion_tokens=meta.completion_tokens,
    )


def _dtype_name(dtype: torch.dtype | str) -> str:
    # SGLang resolves the name with getattr(torch, name): "bfloat16", not "torch.bfloat16".
    return str(dtype).removeprefix("torch.")


class SGLangClient:
    """One SGLang (or SGLang-compatible) server, driven over HTTP. Use it inside one event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_seconds: float = 600.0,
        connect_timeout_seconds: float = 10.0,
        health_timeout_seconds: float = 30.0,
        retries: int = 3,
        backoff_seconds: float = 0.25,
        max_backoff_seconds: float = 4.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, sock_connect=connect_timeout_seconds
        )
        self._health_timeout = aiohttp.ClientTimeout(total=health_timeout_seconds)
        self._retries = retries
        self._backoff_seconds = backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SGLangClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the EngineClient seam ---------------------------------------------------------------

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """One batched ``/generate``; outputs come back in the order of ``requests``."""
        if not requests:
            return []
        body = _GenerateBody(
            input_ids=[r.input_ids for r in requests],
            sampling_params=[
                _SamplingParamsBody(
                    max_new_tokens=r.sampling_params.max_new_tokens,
                    temperature=r.sampling_params.temperature,
                    top_p=r.sampling_params.top_p,
                    top_k=r.sampling_params.top_k,
                    stop=r.sampling_params.stop,
                    stop_token_ids=r.sampling_params.stop_token_ids,
                    # miles keeps the stop string in the text, as the transformers engine does.
                    no_stop_trim=True,
                    sampling_seed=r.sampling_params.sampling_seed,
                )
                for r in requests
            ],
            rid=[r.rid for r in requests],
            return_logprob=[r.return_logprob for r in requests],
        )
        content = await self._call("POST", "/generate", body, idempotent=False)
        results = self._decode(content, list[_GenerateResult], "/generate")
        by_rid = {result.meta_info.id: result for result in results}
        missing = [r.rid for r in requests if r.rid not in by_rid]
        if missing or len(results) != len(requests):
            raise SGLangError(f"/generate answered rids {sorted(by_rid)}; missing {missing}")
        return [_to_output(by_rid[request.rid], request) for request in requests]

    async def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load the Hugging Face checkpoint at ``model_path`` (a path the *server* can read)."""
        body = {"model_path": model_path, "weight_version": str(weight_version)}
        await self._call_for_success("/update_weights_from_disk", body, idempotent=True)

    async def pause_generation(self, mode: PauseMode = "abort") -> None:
        """Stop scheduling: new requests wait for ``continue_generation``.

        ``mode`` is SGLang's: ``abort`` (its default) ends the running requests with
        ``finish_reason == "abort"``, which the caller must regenerate; ``retract`` and
        ``in_place`` keep them and finish them after ``continue_generation``, on whatever
        weights are loaded by then.
        """
        await self._call("POST", "/pause_generation", {"mode": mode}, idempotent=True)

    async def continue_generation(self) -> None:
        await self._call("POST", "/continue_generation", {}, idempotent=True)

    async def miles_weights_checksum(self) -> dict[str, str]:
        """sha256 per weight name: miles' CPU server only (``/miles/weights_checksum``)."""
        content = await self._call("GET", "/miles/weights_checksum", None, idempotent=True)
        return dict(msgspec.json.decode(content)["checksums"])

    async def weight_version(self) -> int:
        content = await self._call("GET", "/get_model_info", None, idempotent=True)
        info = self._decode(content, _ModelInfo, "/get_model_info")
        return parse_weight_version(info.weight_version)

    async def health(self) -> bool:
        """``/health_generate`` answers 200: the server generates a token. Never raises."""
        try:
            session = self._session_for_call()
            url = self.base_url + "/health_generate"
            async with session.get(url, timeout=self._health_timeout) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError) as error:
            log.debug("health check of %s failed: %s", self.base_url, error)
            return False

    # --- the rest of SGLang's control surface -------------------------------------------------

    async def flush_cache(self) -> None:
        """Drop the prefix cache; SGLang refuses (HTTP 400) while requests are running."""
        await self._call("POST", "/flush_cache", None, idempotent=True)

    async def abort(self, rid: str) -> None:
        await self._call("POST", "/abort_request", {"rid": rid}, idempotent=True)

    async def abort_all(self) -> None:
        await self._call("POST", "/abort_request", {"abort_all": True}, idempotent=True)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the trainer's group as ranks ``rank_offset..``; returns once everyone joined."""
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        await self._call_for_success("/init_weights_update_group", body, idempotent=False)

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[torch.dtype | str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        weight_version: int,
    ) -> None:
        """Receive ``names`` by broadcast from rank 0, in order, while the trainer broadcasts."""
        body = {
            "names": list(names),
            "dtypes": [_dtype_name(dtype) for dtype in dtypes],
            "shapes": [list(shape) for shape in shapes],
            "group_name": group_name,
            "weight_version": str(weight_version),
        }
        await self._call_for_success("/update_weights_from_distributed", body, idempotent=False)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        body = {"group_name": group_name}
        await self._call_for_success("/destroy_weights_update_group", body, idempotent=True)

    async def update_weights_from_tensor(
        self,
        serialized_named_tensors: Sequence[bytes],
        weight_version: int,
        load_format: str | None = None,
    ) -> None:
        """Hand the engine tensors by handle (``miles.engine.shared_tensors``), one payload per
        engine TP rank.

        SGLang's ``MultiprocessingSerializer`` format holds CUDA IPC handles (shared-memory
        names for CPU tensors), so it only works for a trainer on the server's node; the bytes
        go base64-encoded, as SGLang's HTTP route expects.
        """
        body: dict[str, object] = {
            "serialized_named_tensors": [
                base64.b64encode(b).decode() for b in serialized_named_tensors
            ],
            "weight_version": str(weight_version),
        }
        if load_format is not None:
            body["load_format"] = load_format
        await self._call_for_success("/update_weights_from_tensor", body, idempotent=True)

    # --- transport ------------------------------------------------------------------------------

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _call(self, method: str, route: str, body: object, *, idempotent: bool) -> bytes:
        url = self.base_url + route
        data = None if body is None else msgspec.json.encode(body)
        headers = {"Content-Type": "application/json"}
        attempts = 1 + self._retries if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                session = self._session_for_call()
                async with session.request(method, url, data=data, headers=headers) as response:
                    content = await response.read()
                    status = response.status
            except aiohttp.ClientConnectionError as error:
                if attempt == attempts:
                    raise SGLangConnectionError(
                        f"{method} {url} failed after {attempt} attempt(s): {error!r}"
                    ) from error
                delay = min(self._max_backoff_seconds, self._backoff_seconds * 2 ** (attempt - 1))
                log.warning("%s %s: %r; retry %d in %.2fs", method, url, error, attempt, delay)
                await asyncio.sleep(delay)
                continue
            except TimeoutError as error:
                raise SGLangConnectionError(
                    f"{method} {url} got no answer within {self._timeout.total}s"
                ) from error
            if status >= 400:
                raise SGLangHTTPError(method, url, status, content)
            return content
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _call_for_success(self, route: str, body: object, *, idempotent: bool) -> None:
        """A control route answering ``{"success": bool, "message": str}``."""
        content = await self._call("POST", route, body, idempotent=idempotent)
        if not self._decode(content, _Success, route).success:
            raise SGLangHTTPError("POST", self.base_url + route, 200, content)

    def _decode(self, content: bytes, type_: type[T], route: str) -> T:
        try:
            return msgspec.json.decode(content, type=type_)
        except msgspec.DecodeError as error:
            excerpt = content[:BODY_EXCERPT_CHARS].decode(errors="replace")
            raise SGLangError(
                f"{self.base_url}{route}: unexpected answer ({error}): {excerpt}"
            ) from error


# --- the trainer's side of the weight-update group ----------------------------------------------


class WeightUpdateGroup:
    """One member of the process group that ``/init_weights_update_group`` creates.

    The trainer is rank 0 and broadcasts; each engine joins as ``rank_offset + tp_rank``. The
    group does not touch torch's default process group, so a trainer already inside one (DDP,
    Megatron) can hold this too. Its store keys follow torch's own group layout
    (``<group_name>/<device>/``, rank 0 hosting the TCP store), the layout SGLang's
    ``init_custom_process_group`` gets from torch; with real SGLang that is unverified here (no
    GPU), with the CPU server it is tested.
    """

    def __init__(
        self,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: Literal["gloo", "nccl"] = "nccl",
        timeout_seconds: float = 300.0,
    ) -> None:
        timeout = timedelta(seconds=timeout_seconds)
        store = dist.TCPStore(
            master_address,
            master_port,
            world_size,
            is_master=rank == 0,
            timeout=timeout,
            multi_tenant=True,
        )
        device = "cuda" if backend == "nccl" else "cpu"
        prefixed = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", store))
        # Any: torch's stubs leave ``broadcast`` off its backend classes, which do have it.
        self._group: Any
        if backend == "gloo":
            self._group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        elif dist.is_nccl_available():
            options = dist.ProcessGroupNCCL.Options()
            self._group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            raise RuntimeError("backend='nccl' needs a CUDA build of torch")
        self._store = store  # rank 0's store serves the rendezvous for the group's lifetime
        self.rank = rank

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In place: ``tensor`` is sent from rank ``src`` and received by every other rank."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        self._group.broadcast([tensor], options).wait()


async def _first_error_or_all(*awaitables: Awaitable[object]) -> None:
    """Wait for all; on the first failure raise it at once rather than wait for the others.

    A collective whose peer gave up (the server refused the request) only fails at the group's
    timeout; the server's HTTP error says why, so it is raised as soon as it arrives. The group is
    then unusable: destroy it and form a new one.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def join_weight_update_group(
    engines: Sequence[SGLangClient],
    master_address: str,
    master_port: int,
    group_name: str = "weight_update_group",
    backend: Literal["gloo", "nccl"] = "nccl",
    ranks_per_engine: int = 1,
) -> WeightUpdateGroup:
    """The trainer (rank 0) and every engine form one group: one broadcast reaches all engines."""
    world_size = 1 + ranks_per_engine * len(engines)
    trainer_side = asyncio.ensure_future(
        asyncio.to_thread(
            WeightUpdateGroup, master_address, master_port, 0, world_size, group_name, backend
        )
    )
    await _first_error_or_all(
        trainer_side,
        *(
            engine.init_weights_update_group(
                master_address,
                master_port,
                1 + i * ranks_per_engine,
                world_size,
                group_name,
                backend,
            )
            for i, engine in enumerate(engines)
        ),
    )
    return trainer_side.result()


async def broadcast_weights(
    engines: Sequence[SGLangClient],
    group: WeightUpdateGroup,
    named_tensors: Mapping[str, torch.Tensor],
    group_name: str,
    weight_version: int,
) -> None:
    """Announce ``named_tensors`` to every engine and broadcast them, in the announced order.

    The tensors must be contiguous and on the group's device (CPU for gloo, the GPU for nccl).
    """
    names = list(named_tensors)
    tensors = [named_tensors[name] for name in names]

    def send() -> None:
        for tensor in tensors:
            group.broadcast(tensor, src=0)

    dtypes = [t.dtype for t in tensors]
    shapes = [t.shape for t in tensors]
    await _first_error_or_all(
        asyncio.to_thread(send),
        *(
            engine.update_weights_from_distributed(
                names, dtypes, shapes, group_name, weight_version
            )
            for engine in engines
        ),
    )
