"""Reward models as scorers: the HTTP scorer against a real local server, and the Hugging Face
classifier's scoring on a tiny model built from a config (no Ray: tests/integration runs it on
an actor)."""

from __future__ import annotations

import asyncio
import string
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from miles import events
from miles.config import HTTPRewardModel, load_config
from miles.runtime.embedded import free_port
from miles.scoring import Failure, Limits, score_samples
from miles.scoring.hf_model import SequenceClassifier
from miles.scoring.http_model import HTTPScorer
from miles.scoring.models import close_models, reward_models

PAIRS = [
    ("57+68=", "521"),
    ("What is the capital of France? ", "Paris, of course."),
    ("", "an empty prompt"),
    ("Say nothing.", ""),
    ("Count: ", "1 2 3 4 5 6 7 8 9 10 11 12"),
    ("x", "y"),
]


def make_sample(index: int, prompt: str, completion: str, **fields: Any) -> events.Sample:
    return events.Sample(
        sample_id=f"s{index}",
        prompt=prompt,
        label=fields.pop("label", f"label-{index}"),
        prompt_ids=[],
        response_ids=[],
        response_logprobs=[],
        response_text=completion,
        finish_reason="stop",
        policy_version_first=0,
        policy_version_last=0,
        **fields,
    )


def build_reward_model(directory: Path, architecture: str = "llama") -> Path:
    """A random tiny classifier (one label) and a character tokenizer that adds a BOS, saved
    like a real reward model; built offline from a config. Llama's rotary positions are
    relative, GPT-2's are absolute: only GPT-2 would see where padding shifted a pair."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: index for index, token in enumerate([*specials, *string.printable])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",  # the classifier must pad on the right whatever the tokenizer says
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    tokens = dict(
        vocab_size=len(tokenizer),
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model: LlamaForSequenceClassification | GPT2ForSequenceClassification
    if architecture == "llama":
        llama = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **tokens,
        )
        model = LlamaForSequenceClassification(llama)
    else:
        gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **tokens)
        model = GPT2ForSequenceClassification(gpt2)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def reward_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return build_reward_model(tmp_path_factory.mktemp(request.param), request.param)


def direct(classifier: SequenceClassifier, text: str, **encode: Any) -> float:
    """The first logit of one unpadded forward pass."""
    ids = classifier.tokenizer(text, return_tensors="pt", **encode)["input_ids"]
    with torch.no_grad():
        return float(classifier.model(input_ids=ids).logits[0, 0])


# -- the Hugging Face classifier ---------------------------------------------------------------


def test_rewards_are_the_first_logit_of_each_pair(reward_model_dir: Path) -> None:
    classifier = SequenceClassifier(str(reward_model_dir), batch_size=4)
    prompts, completions = zip(*PAIRS, strict=True)
    rewards = classifier.score(prompts, completions)
    expected = [direct(classifier, p + c) for p, c in PAIRS]
    assert rewards == pytest.approx(expected, abs=1e-6)
    assert len(set(rewards)) == len(rewards)  # the pairs are told apart
    assert not classifier.model.training


def test_a_reward_does_not_depend_on_the_batch(reward_model_dir: Path) -> None:
    prompts, completions = zip(*PAIRS, strict=True)
    by_size = {
        size: SequenceClassifier(str(reward_model_dir), batch_size=size).score(prompts, completions)
        for size in (1, 2, 4, 16)
    }
    for rewards in by_size.values():
        assert rewards == pytest.approx(by_size[1], abs=1e-6)
    alone = SequenceClassifier(str(reward_model_dir)).score(prompts[-1:], completions[-1:])
    assert alone == pytest.approx(by_size[16][-1:], abs=1e-6)


def test_truncation_drops_the_start_of_the_prompt_and_keeps_the_completion(
    reward_model_dir: Path,
) -> None:
    classifier = SequenceClassifier(str(reward_model_dir), batch_size=3, max_length=12)
    completion = "the answer"  # 10 characters: BOS + "x" + completion fill 12 tokens
    prompts = ["a long prompt that is cut x", "another one, cut as well x", "x"]
    rewards = classifier.score(prompts, [completion] * 3)
    assert rewards == pytest.approx([rewards[2]] * 3, abs=1e-6)
    assert rewards[2] == pytest.approx(direct(classifier, "x" + completion), abs=1e-6)
    assert classifier.score(["x"], ["THE ANSWER"]) != pytest.approx(rewards[2:], abs=1e-6)


def test_chat_template_scores_the_rendered_conversation(reward_model_dir: Path) -> None:
    classifier = SequenceClassifier(str(reward_model_dir), batch_size=2, chat_template=True)
    prompts, completions = zip(*PAIRS, strict=True)
    rendered = classifier.texts(prompts, completions)
    assert rendered[0] == "<bos>[user] 57+68=\n[assistant] 521\n"
    rewards = classifier.score(prompts, completions)
    expected = [direct(classifier, text, add_special_tokens=False) for text in rendered]
    assert rewards == pytest.approx(expected, abs=1e-6)


# -- the HTTP scorer -------------------------------------------------------------------------

Handler = Callable[[web.Request], Any]


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Any]]:
    """``await server(handler)``: a real HTTP server on a free loopback port, with the requests
    it received in ``.requests``."""
    started: list[TestServer] = []

    async def start(handler: Handler) -> TestServer:
        app = web.Application()
        app.router.add_post("/score", handler)
        test_server = TestServer(app, host="127.0.0.1")
        await test_server.start_server()
        started.append(test_server)
        return test_server

    yield start
    for test_server in started:
        await test_server.close()


def scorer(url: str, **fields: Any) -> HTTPScorer:
    return HTTPScorer(HTTPRewardModel(url=url, backoff_seconds=0.01, **fields))


def samples(n: int = 3) -> list[events.Sample]:
    return [make_sample(i, f"{i}+{i}=", str(2 * i), metadata={"row": i}) for i in range(n)]


async def test_http_scores_a_group_in_the_documented_format(server: Any) -> None:
    received: list[tuple[Any, str]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        received.append((body, request.headers["Authorization"]))
        return web.json_response({"rewards": [len(c) for c in body["completions"]], "x": 1})

    test_server = await server(handler)
    remote = scorer(str(test_server.make_url("/score")), headers={"Authorization": "Bearer t"})
    group = samples(3)
    group[0].label = {"answer": 0, "units": ["m"]}  # a label of any JSON type goes as it is
    try:
        assert await remote.score(group, Limits(4, 5.0)) == [1.0, 1.0, 1.0]
        group[2].response_text = "four"
        assert await remote.score(group, Limits(4, 5.0)) == [1.0, 1.0, 4.0]
    finally:
        await remote.close()
    assert received[0] == (
        {
            "prompts": [
                "0+0=",
                "1+1=",
                "2+2=",
            ],
            "completions": ["0", "2", "4"],
            "labels": [{"answer": 0, "units": ["m"]}, "label-1", "label-2"],
            "metadata": [{"row": 0}, {"row": 1}, {"row": 2}],
        },
        "Bearer t",
    )


async def test_http_retries_a_5xx_then_succeeds(server: Any) -> None:
    statuses = [500, 503, 200]

    async def handler(request: web.Request) -> web.Response:
        status = statuses.pop(0)
        if status != 200:
            return web.Response(status=status, text="overloaded")
        return web.json_response({"rewards": [0.5, -1]})

    remote = scorer(str((await server(handler)).make_url("/score")), retries=2)
    try:
        assert await remote.score(samples(2), Limits(4, 5.0)) == [0.5, -1.0]
    finally:
        await remote.close()
    assert statuses == []


async def test_http_gives_up_after_its_retries(server: Any) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=502, text="bad gateway")

    url = str((await server(handler)).make_url("/score"))
    remote = scorer(url, retries=2)
    try:
        outcomes = await remote.score(samples(2), Limits(4, 5.0))
    finally:
        await remote.close()
    assert calls == 3
    last = 'HTTP 502: "bad gateway"'
    error = f"remote_reward: no rewards from {url} after 3 attempts; last: {last}"
    assert outcomes == [Failure(error)] * 2


async def test_http_4xx_fails_at_once_quoting_the_body(server: Any) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=422, text="prompts too long\n" + "x" * 500)

    url = str((await server(handler)).make_url("/score"))
    remote = scorer(url, retries=3, name="judge")
    try:
        [outcome, _] = await remote.score(samples(2), Limits(4, 5.0))
    finally:
        await remote.close()
    assert calls == 1
    assert isinstance(outcome, Failure)
    quoted = '"prompts too long\\n' + "x" * 183 + '"'  # the first 200 characters, on one line
    assert outcome.error == f"judge: {url} answered HTTP 422: {quoted}"
    assert "\n" not in outcome.error


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"rewards": [1.0]}, "answered 1 rewards for 2 completions"),
        ({"rewards": [1.0, "2"]}, "answered a reward that is not a number: '2'"),
        ({"rewards": [1.0, None]}, "answered a reward that is not a number: None"),
        ({"rewards": [True, 1]}, "answered a reward that is not a number: True"),
        ({"scores": [1.0, 2.0]}, 'answered "{\\"scores\\": [1.0, 2.0]}", not {"rewards": [...]}'),
        ([1.0, 2.0], 'answered "[1.0, 2.0]", not {"rewards": [...]}'),
        ("<html>oops</html>", 'answered "<html>oops</html>", which is not JSON'),
        ("", "answered an empty body, which is not JSON"),
    ],
)
async def test_http_malformed_answer_fails_the_samples(
    server: Any, answer: Any, error: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        if isinstance(answer, str):
            return web.Response(text=answer)
        return web.json_response(answer)

    remote = scorer(str((await server(handler)).make_url("/score")), retries=3)
    try:
        outcomes = await remote.score(samples(2), Limits(4, 5.0))
    finally:
        await remote.close()
    assert outcomes == [Failure(f"remote_reward: {error}")] * 2


async def test_http_timeout_is_retried_then_fails_the_samples(server: Any) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return web.json_response({"rewards": [1.0, 1.0]})

    url = str((await server(handler)).make_url("/score"))
    remote = scorer(url, retries=1, timeout_seconds=0.2)
    start = time.monotonic()
    try:
        outcomes = await remote.score(samples(2), Limits(4, 5.0))
    finally:
        await remote.close()
    assert time.monotonic() - start < 2
    assert calls == 2
    last = "timed out after 0.2s"
    assert (
        outcomes
        == [Failure(f"remote_reward: no rewards from {url} after 2 attempts; last: {last}")] * 2
    )


async def test_http_call_is_bounded_by_reward_timeout_seconds_too(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"rewards": [1.0]})

    url = str((await server(handler)).make_url("/score"))
    remote = scorer(url, retries=0, timeout_seconds=30)
    try:
        [outcome] = await remote.score(samples(1), Limits(4, 0.2))
    finally:
        await remote.close()
    assert outcome == Failure(
        f"remote_reward: no rewards from {url} after 1 attempt; last: timed out after 0.2s"
    )


async def test_http_connection_refused_is_retried_then_fails() -> None:
    url = f"http://127.0.0.1:{free_port()}/score"
    remote = scorer(url, retries=2)
    try:
        [outcome] = await remote.score(samples(1), Limits(4, 5.0))
    finally:
        await remote.close()
    assert isinstance(outcome, Failure)
    assert outcome.error.startswith(
        f"remote_reward: no rewards from {url} after 3 attempts; last: ClientConnectorError"
    )


async def test_a_label_json_cannot_encode_fails_the_samples() -> None:
    remote = scorer("http://127.0.0.1:9/score")
    [outcome] = await remote.score([make_sample(0, "p", "c", label=b"bytes")], Limits(4, 5.0))
    assert outcome == Failure(
        "remote_reward raised TypeError: Object of type bytes is not JSON serializable"
    )


async def test_reward_models_are_scored_and_weighed_with_the_functions(server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"rewards": [float(c) for c in body["completions"]]})

    url = str((await server(handler)).make_url("/score"))
    config = load_config(
        overrides=[
            f'reward.models=[{{kind="http", name="judge", url="{url}"}}]',
            "reward.weights={judge=0.5}",
        ]
    )
    scorers = reward_models(config)
    assert [s.name for s in scorers] == ["judge"]
    group = samples(3)
    try:
        values = await score_samples(group, scorers, config.reward.weights, Limits(4, 5.0))
    finally:
        await close_models(scorers)
    assert values == [{"judge": 0.0}, {"judge": 2.0}, {"judge": 4.0}]
    assert [s.reward for s in group] == [0.0, 1.0, 2.0]
