"""A reference server for ``kind = "http"`` reward models: a local Hugging Face classifier.

    python -m miles.scoring.serve_reward_model --model DIR --port 8000

answers ``POST /score`` with ``{"prompts", "completions", "labels", "metadata"}`` (only the
first two are read) by ``{"rewards": [...]}``, the first logit of each pair as the ``hf`` kind
computes it, and ``GET /health`` with 200 once the model is loaded. A malformed request gets a
400 with the reason (the reward service does not retry a 4xx). One forward pass runs at a time,
on a worker thread, so the server keeps answering health checks while it scores.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from aiohttp import web

from miles.scoring.hf_model import SequenceClassifier

log = logging.getLogger("miles.serve_reward_model")
CLASSIFIER = web.AppKey("classifier", SequenceClassifier)
ONE_AT_A_TIME = web.AppKey("one_at_a_time", asyncio.Lock)


def pairs(request: Any) -> tuple[list[str], list[str]]:
    """The request's prompts and completions, checked; ``ValueError`` says what is wrong."""
    if not isinstance(request, dict):
        raise ValueError('expected a JSON object {"prompts": [...], "completions": [...]}')
    prompts, completions = _texts(request, "prompts"), _texts(request, "completions")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return prompts, completions


def _texts(request: dict[str, Any], key: str) -> list[str]:
    texts = request.get(key)
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ValueError(f'"{key}" must be a list of strings')
    return texts


async def score(request: web.Request) -> web.Response:
    try:
        prompts, completions = pairs(await request.json())
    except ValueError as exc:  # JSONDecodeError included
        raise web.HTTPBadRequest(text=str(exc)) from None
    classifier = request.app[CLASSIFIER]
    async with request.app[ONE_AT_A_TIME]:
        rewards = await asyncio.to_thread(classifier.score, prompts, completions)
    return web.json_response({"rewards": rewards})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app(classifier: SequenceClassifier) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)  # a group of long completions
    app[CLASSIFIER] = classifier
    app[ONE_AT_A_TIME] = asyncio.Lock()
    app.router.add_post("/score", score)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a Hugging Face sequence classifier as an http reward model."
    )
    parser.add_argument("--model", required=True, help="local model directory (or cached hub id)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens, cut on the left")
    parser.add_argument("--chat-template", action="store_true", help="as the hf kind's option")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    classifier = SequenceClassifier(
        args.model,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template=args.chat_template,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    log.info("serving %s on http://%s:%d/score", args.model, args.host, args.port)
    web.run_app(make_app(classifier), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
