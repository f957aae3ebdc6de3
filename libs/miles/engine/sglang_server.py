"""A CPU stand-in for an SGLang server: SGLang's native routes and fields over TransformersEngine.

``python -m miles.engine.sglang_server --model-path DIR --port P [--host 127.0.0.1]``

It exists so that ``SGLangClient`` is tested over real HTTP where SGLang's runtime cannot run,
and so a CPU-only deployment has the same one-engine-one-process shape as a GPU one. Request
bodies are decoded strictly: a field SGLang does not define (or this server does not
implement) is a 400, which keeps the client honest. Field names follow the SGLang sources cited
in ``sglang_client``. Where it departs from SGLang:

- One ``/generate`` call is one batch; concurrent calls queue for the model instead of being
  merged by a scheduler.
- A running batch is never interrupted: pausing with ``mode="abort"`` (SGLang's default) or
  ``/abort_request`` marks its requests aborted and they are answered so when the batch ends;
  ``retract``/``in_place`` let it finish on the weights it started with. Requests that arrive
  while paused wait for ``/continue_generation``, as in SGLang.
- ``weight_version`` is the server's label (SGLang keeps it in its server args, too).
- There is no prefix cache: ``/flush_cache`` only refuses while requests are live, as SGLang's.
- ``/health_generate`` answers while paused (SGLang's probe waits behind the pause).
- ``/update_weights_from_tensor`` takes CPU tensors in shared memory (``file_system`` handles,
  see ``miles.engine.shared_tensors``) where SGLang takes CUDA IPC handles, and loads the
  payload with an unpickler that resolves torch's tensor rebuild functions and nothing else.
  The server has one TP rank, so it reads the first of ``serialized_named_tensors``.
  Weight-update groups use ``gloo`` only.
- ``/miles/weights_checksum`` is miles' own debug route, not SGLang's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import logging
import os
import pickle
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import torch
from aiohttp import web
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from miles import shards
from miles.engine.protocol import GenerateOutput, GenerateRequest, SamplingParams
from miles.engine.sglang_client import WeightUpdateGroup
from miles.engine.shared_tensors import load_named_tensors
from miles.engine.transformers_engine import TransformersEngine

log = logging.getLogger("miles.sglang_server")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    """The request cannot be served; answered with HTTP 400 and this message."""


# --- request bodies: SGLang's names and defaults, the subset served here ------------------------


class _Sampling(msgspec.Struct, forbid_unknown_fields=True):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    sampling_seed: int | None = None
    no_stop_trim: bool = False
    skip_special_tokens: bool = True


class _Generate(msgspec.Struct, forbid_unknown_fields=True):
    input_ids: list[Any]  # one prompt (list[int]) or a batch (list[list[int]])
    sampling_params: _Sampling | list[_Sampling] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    log_metrics: bool = True


class _Pause(msgspec.Struct, forbid_unknown_fields=True):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class _Continue(msgspec.Struct, forbid_unknown_fields=True):
    torch_empty_cache: bool = True


class _Abort(msgspec.Struct, forbid_unknown_fields=True):
    rid: str | None = None
    abort_all: bool = False


class _FromDisk(msgspec.Struct, forbid_unknown_fields=True):
    model_path: str
    weight_version: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True


class _InitGroup(msgspec.Struct, forbid_unknown_fields=True):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class _FromDistributed(msgspec.Struct, forbid_unknown_fields=True):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    weight_version: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True


class _FromTensor(msgspec.Struct, forbid_unknown_fields=True):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    weight_version: str | None = None
    abort_all_requests: bool = False
    flush_cache: bool = True


class _GroupName(msgspec.Struct, forbid_unknown_fields=True):
    group_name: str = "weight_update_group"


class _MetaInfo(msgspec.Struct, omit_defaults=True):
    id: str
    finish_reason: dict[str, object]
    prompt_tokens: int
    completion_tokens: int
    weight_version: str
    output_token_logprobs: list[tuple[float, int, str | None]] | None = None


class _Result(msgspec.Struct):
    text: str
    output_ids: list[int]
    meta_info: _MetaInfo


async def _body(request: web.Request, type_: type[T]) -> T:
    raw = await request.read()
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except msgspec.MsgspecError as error:
        raise BadRequest(f"invalid body ({error})") from error


def _json(content: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(content), status=status, content_type="application/json"
    )


def _outcome(success: bool, message: str) -> web.Response:
    return _json({"success": success, "message": message}, 200 if success else 400)


def tensor_checksum(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: comparable between trainer and server."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode() + data).hexdigest()


def _live_weights(engine: TransformersEngine) -> dict[str, torch.Tensor]:
    # TransformersEngine has no public accessor for its parameters yet (a ``named_weights()``
    # would do); ``state_dict()`` shares their storage, so copying into it updates the model.
    return engine._model.state_dict()


class LocalSGLangServer:
    """The routes, over one ``TransformersEngine``; every model access runs on one thread."""

    def __init__(
        self,
        model_path: str,
        weight_version: str = "0",
        threads: int = 2,
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path or model_path
        self.weight_version = weight_version
        self._engine = TransformersEngine(
            model_path,
            threads=threads,
            tokenizer_path=tokenizer_path,
            trust_remote_code=trust_remote_code,
        )
        self._tokenizer = AutoTokenizer.from_pretrained(
            self.tokenizer_path, local_files_only=True, trust_remote_code=trust_remote_code
        )
        self._vocab_size: int = AutoConfig.from_pretrained(
            model_path, trust_remote_code=trust_remote_code
        ).vocab_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._model_lock = asyncio.Lock()  # one batch or one weight update at a time
        self._state = asyncio.Condition()  # guards and announces the pause and abort state
        self._paused = False
        self._live: set[str] = set()  # rids accepted and not yet answered
        self._aborted: set[str] = set()
        self._groups: dict[str, WeightUpdateGroup] = {}
        # Fault injection for the straggler test (miles.runtime.faults): seconds per generate.
        self._delay = float(os.environ.get("MILES_ENGINE_DELAY", "0") or 0)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors_as_json], client_max_size=1 << 30)
        post, get = web.post, web.get
        app.add_routes(
            [
                post("/generate", self.generate),
                web.put("/generate", self.generate),
                get("/health", self.health),
                get("/health_generate", self.health_generate),
                get("/get_model_info", self.model_info),
                get("/get_server_info", self.model_info),
                get("/get_weight_version", self.model_info),
                get("/flush_cache", self.flush_cache),
                post("/flush_cache", self.flush_cache),
                post("/pause_generation", self.pause_generation),
                post("/continue_generation", self.continue_generation),
                post("/abort_request", self.abort_request),
                post("/update_weights_from_disk", self.update_weights_from_disk),
                post("/init_weights_update_group", self.init_weights_update_group),
                post("/update_weights_from_distributed", self.update_weights_from_distributed),
                post("/destroy_weights_update_group", self.destroy_weights_update_group),
                post("/update_weights_from_tensor", self.update_weights_from_tensor),
                get("/miles/weights_checksum", self.weights_checksum),
            ]
        )
        return app

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- generation -------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.Response:
        body = await _body(request, _Generate)
        requests, sampling = self._requests(body)
        if self._delay:
            await asyncio.sleep(self._delay)
        outputs, aborted = await self._generate(requests)
        with_text = body.return_text_in_logprobs
        results = [
            self._result(r, s, outputs.get(r.rid), r.rid in aborted, with_text)
            for r, s in zip(requests, sampling, strict=True)
        ]
        single = not isinstance(body.input_ids[0], list)
        return _json(results[0] if single else results)

    def _requests(self, body: _Generate) -> tuple[list[GenerateRequest], list[_Sampling]]:
        """SGLang's single or batched form, normalised to one request per prompt."""
        if body.stream:
            raise BadRequest("stream=true is not supported by the CPU server")
        if not body.input_ids:
            raise BadRequest("input_ids cannot be empty")
        single = not isinstance(body.input_ids[0], list)
        prompts = msgspec.convert([body.input_ids] if single else body.input_ids, list[list[int]])
        count = len(prompts)

        def per_request(value: T | list[T] | None, default: T, name: str) -> list[T]:
            if value is None:
                return [default] * count
            if not isinstance(value, list):
                return [value] * count
            if len(value) != count:
                raise BadRequest(f"{name} has {len(value)} entries for {count} prompts")
            return value

        if body.rid is None:
            rids = [uuid.uuid4().hex for _ in range(count)]
        elif isinstance(body.rid, list):
            rids = per_request(body.rid, "", "rid")
        else:  # SGLang expands one rid over a batch as a prefix
            rids = [body.rid] if single else [f"{body.rid}_{i}" for i in range(count)]
        if len(set(rids)) != count:
            raise BadRequest(f"duplicate rids in one request: {rids}")
        sampling = per_request(body.sampling_params, _Sampling(), "sampling_params")
        logprob = per_request(body.return_logprob, False, "return_logprob")
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
            self._check(i, prompt, params)
            requests.append(
                GenerateRequest(
                    rid=rids[i],
                    input_ids=prompt,
                    return_logprob=logprob[i],
                    sampling_params=SamplingParams(
                        max_new_tokens=params.max_new_tokens,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        stop=[params.stop] if isinstance(params.stop, str) else params.stop or [],
                        stop_token_ids=params.stop_token_ids or [],
                        sampling_seed=params.sampling_seed,
                    ),
                )
            )
        return requests, sampling

    def _check(self, index: int, prompt: list[int], params: _Sampling) -> None:
        """The checks of SGLang's ``SamplingParams.verify``, and token ids the model knows."""
        if not prompt:
            raise BadRequest(f"input_ids[{index}] is empty")
        outside = [t for t in prompt if not 0 <= t < self._vocab_size]
        if outside:
            raise BadRequest(
                f"input_ids[{index}] has ids {outside} outside the vocabulary (size "
                f"{self._vocab_size})"
            )
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.max_new_tokens < 0:
            raise BadRequest(
                f"sampling_params[{index}]: need temperature >= 0, 0 < top_p <= 1, "
                "max_new_tokens >= 0"
            )

    async def _generate(
        self, requests: list[GenerateRequest]
    ) -> tuple[dict[str, GenerateOutput], set[str]]:
        """Wait while paused, run one batch, and say which rids were aborted meanwhile."""
        rids = {r.rid for r in requests}
        if rids & self._live:
            raise BadRequest(f"rids already in flight: {sorted(rids & self._live)}")
        self._live |= rids
        try:
            while True:
                async with self._state:
                    await self._state.wait_for(lambda: not self._paused or rids <= self._aborted)
                async with self._model_lock:
                    if self._paused and not rids <= self._aborted:
                        continue  # paused again while queued for the model
                    todo = [r for r in requests if r.rid not in self._aborted]
                    outputs = await self._run(self._engine.generate, todo) if todo else []
                    return {o.rid: o for o in outputs}, rids & self._aborted
        finally:
            self._live -= rids
            self._aborted -= rids

    def _result(
        self,
        request: GenerateRequest,
        params: _Sampling,
        output: GenerateOutput | None,
        aborted: bool,
        with_text: bool,
    ) -> _Result:
        """One result in SGLang's shape: text, output_ids and meta_info."""
        ids = output.output_ids if output else []
        text = str(self._tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens))
        finish: dict[str, object]
        if aborted or output is None:
            finish = {"type": "abort", "message": "Abort requested"}
        elif output.finish_reason == "length":
            finish = {"type": "length", "length": len(ids)}
        elif ids[-1] in {*request.sampling_params.stop_token_ids, self._tokenizer.eos_token_id}:
            finish = {"type": "stop", "matched": ids[-1]}
        else:  # a stop string: the engine checks the text without special tokens
            plain = str(self._tokenizer.decode(ids, skip_special_tokens=True))
            stops = request.sampling_params.stop
            matched = min((plain.find(s), s) for s in stops if s in plain)[1]
            finish = {"type": "stop", "matched": matched}
            cut = text.find(matched)
            if not params.no_stop_trim and cut >= 0:
                text = text[:cut]
        logprobs = None
        if request.return_logprob:
            texts = [str(self._tokenizer.decode([t])) if with_text else None for t in ids]
            values = output.output_token_logprobs if output else []
            logprobs = list(zip(values, ids, texts, strict=True))
        meta = _MetaInfo(
            id=request.rid,
            finish_reason=finish,
            prompt_tokens=len(request.input_ids),
            completion_tokens=len(ids),
            weight_version=self.weight_version,
            output_token_logprobs=logprobs,
        )
        return _Result(text=text, output_ids=ids, meta_info=meta)

    # --- scheduling control -----------------------------------------------------------------

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await _body(request, _Pause)
        async with self._state:
            self._paused = True
            if body.mode == "abort":
                self._aborted |= self._live
            self._state.notify_all()
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await _body(request, _Continue)
        async with self._state:
            self._paused = False
            self._state.notify_all()
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _body(request, _Abort)
        async with self._state:
            self._aborted |= self._live if body.abort_all else self._live & {body.rid or ""}
            self._state.notify_all()
        return web.Response()

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self._live:
            return web.Response(text="Cache not flushed: requests are running.\n", status=400)
        return web.Response(text="Cache flushed.\n")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def health_generate(self, request: web.Request) -> web.Response:
        async with self._model_lock:
            healthy = await self._run(self._engine.health)
        return web.Response(status=200 if healthy else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        return _json(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.tokenizer_path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.weight_version,
            }
        )

    # --- weights ----------------------------------------------------------------------------

    async def _abort_all(self) -> None:
        async with self._state:
            self._aborted |= self._live
            self._state.notify_all()

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _body(request, _FromDisk)
        weights = Path(body.model_path)
        if not shards.has_weights(weights):
            return _outcome(False, f"{weights} holds no weights (a Hugging Face safetensors dir)")
        if body.abort_all_requests:
            await self._abort_all()
        async with self._model_lock:
            try:
                version = self._engine.weight_version()  # the server, not the engine, labels
                await self._run(self._engine.update_weights_from_disk, body.model_path, version)
            except (ValueError, OSError, SafetensorError) as error:
                return _outcome(False, f"Failed to load {weights}: {error}")
            self.weight_version = body.weight_version or self.weight_version
        return _json({"success": True, "message": "Succeeded.", "num_paused_requests": 0})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _body(request, _InitGroup)
        if body.backend != "gloo":
            return _outcome(False, f"backend {body.backend!r}: the CPU server has gloo only")
        if body.group_name in self._groups:
            return _outcome(False, f"group {body.group_name!r} already exists")
        try:
            self._groups[body.group_name] = await asyncio.to_thread(
                WeightUpdateGroup,
                body.master_address,
                body.master_port,
                body.rank_offset,
                body.world_size,
                body.group_name,
                "gloo",
            )
        except RuntimeError as error:  # torch.distributed.DistError included
            return _outcome(False, f"Failed to join group {body.group_name!r}: {error}")
        return _outcome(True, f"Joined group {body.group_name!r} as rank {body.rank_offset}.")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await _body(request, _FromDistributed)
        group = self._groups.get(body.group_name)
        if group is None:
            return _outcome(False, f"no weight-update group {body.group_name!r}")
        if not len(body.names) == len(body.dtypes) == len(body.shapes):
            return _outcome(False, "names, dtypes and shapes differ in length")
        dtypes = [getattr(torch, name, None) for name in body.dtypes]
        if not all(isinstance(dtype, torch.dtype) for dtype in dtypes):
            return _outcome(False, f"unknown dtype among {body.dtypes}")
        if body.abort_all_requests:
            await self._abort_all()
        async with self._model_lock:
            try:
                # Every announced tensor is received before any is checked, so a bad name
                # leaves the trainer's broadcasts matched rather than hanging until timeout.
                message = await self._run(self._receive, group, body, dtypes)
            except RuntimeError as error:
                return _outcome(False, f"Failed to receive weights: {error}")
            if message:
                return _outcome(False, message)
            self.weight_version = body.weight_version or self.weight_version
        return _outcome(True, f"Updated {len(body.names)} tensors.")

    def _receive(self, group: WeightUpdateGroup, body: _FromDistributed, dtypes: list[Any]) -> str:
        """Receive every tensor, then copy them into the model if all fit; else say why not."""
        received = {}
        for name, dtype, shape in zip(body.names, dtypes, body.shapes, strict=True):
            received[name] = torch.empty(shape, dtype=dtype)
            group.broadcast(received[name], src=0)
        return self._load(received)

    def _load(self, received: dict[str, torch.Tensor]) -> str:
        """Copy ``received`` into the model if every tensor fits; else load none and say why."""
        live = _live_weights(self._engine)
        unknown = sorted(received.keys() - live.keys())
        misfit = sorted(
            n for n in received.keys() & live.keys() if received[n].shape != live[n].shape
        )
        if unknown or misfit:
            return f"not loaded: unknown names {unknown}, wrong shapes {misfit}"
        with torch.no_grad():
            for name, tensor in received.items():
                live[name].copy_(tensor)
        return ""

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _body(request, _GroupName)
        if self._groups.pop(body.group_name, None) is None:
            return _outcome(False, f"no weight-update group {body.group_name!r}")
        return _outcome(True, f"Destroyed group {body.group_name!r}.")

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        body = await _body(request, _FromTensor)
        if body.load_format is not None:
            return _outcome(False, f"load_format {body.load_format!r}: the CPU server has none")
        if not body.serialized_named_tensors:
            return _outcome(False, "serialized_named_tensors is empty")
        try:
            payload = base64.b64decode(body.serialized_named_tensors[0], validate=True)
        except binascii.Error as error:
            return _outcome(False, f"serialized_named_tensors[0] is not base64: {error}")
        if body.abort_all_requests:
            await self._abort_all()
        async with self._model_lock:
            try:
                # Mapped, copied into the model and dropped on the engine thread: the trainer's
                # segments stay mapped here only for the length of this call.
                message = await self._run(lambda: self._load(dict(load_named_tensors(payload))))
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
                return _outcome(False, f"Failed to load the tensors: {error}")
            if message:
                return _outcome(False, message)
            self.weight_version = body.weight_version or self.weight_version
        return _outcome(True, "Succeeded to update model weights.")

    async def weights_checksum(self, request: web.Request) -> web.Response:
        """miles' debug route: sha256 per weight name, to check a weight update end to end."""
        async with self._model_lock:
            live = _live_weights(self._engine)
            checksums = await self._run(lambda: {n: tensor_checksum(t) for n, t in live.items()})
        return _json({"weight_version": self.weight_version, "checksums": checksums})


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """SGLang's error body, ``{"error": {"message"}}``: 400 for a bad request, 500 for a bug."""
    try:
        return await handler(request)
    except (BadRequest, msgspec.ValidationError) as error:
        return _json({"error": {"message": f"{request.path}: {error}"}}, 400)
    except web.HTTPException:
        raise
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return _json({"error": {"message": f"{type(error).__name__}: {error}"}}, 500)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--weight-version", default="0", help="label of the loaded weights")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tokenizer-path", help="tokenizer directory (default: --model-path)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's code")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    server = LocalSGLangServer(
        args.model_path,
        args.weight_version,
        args.threads,
        args.tokenizer_path,
        args.trust_remote_code,
    )
    log.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
