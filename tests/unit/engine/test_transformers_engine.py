from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from miles import shards
from miles.engine.protocol import GenerateRequest, SamplingParams
from miles.engine.transformers_engine import EnginePaused, TransformersEngine

PROMPTS = ["1+1=", "12+34=", "5", "7+8+9="]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TransformersEngine:
    return TransformersEngine(str(tiny_model_dir), threads=2, weight_version=1)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def encode(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return lambda text: tokenizer(text).input_ids


def make_request(rid: str, input_ids: list[int], **params: object) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=input_ids, sampling_params=SamplingParams(**params))


@torch.inference_mode()
def full_forward_logits(
    model: PreTrainedModel, prompt: list[int], output_ids: list[int]
) -> torch.Tensor:
    """Next-token logits per output position, from one unpadded forward pass without a cache."""
    logits = model(input_ids=torch.tensor([prompt + output_ids])).logits[0]
    return logits[len(prompt) - 1 : -1]


def test_request_gives_same_tokens_alone_or_in_a_batch(engine: TransformersEngine, encode) -> None:
    target = make_request("target", encode("1+1="), max_new_tokens=12, sampling_seed=42)
    neighbours = [
        make_request("long-prompt", encode("12+34+56="), max_new_tokens=4, sampling_seed=1),
        make_request("unseeded", encode("9"), max_new_tokens=20, temperature=0.8, top_p=0.9),
    ]
    (alone,) = engine.generate([target])
    in_batch = engine.generate([neighbours[0], target, neighbours[1]])[1]
    assert in_batch.rid == "target"
    assert in_batch.output_ids == alone.output_ids
    assert in_batch.output_token_logprobs == pytest.approx(alone.output_token_logprobs, abs=1e-5)


def test_logprobs_equal_full_forward_recomputation(
    engine: TransformersEngine, reference_model: PreTrainedModel, encode
) -> None:
    requests = [
        make_request("plain", encode(PROMPTS[0]), max_new_tokens=10, sampling_seed=0),
        make_request(
            "filtered", encode(PROMPTS[1]), max_new_tokens=7, temperature=0.7, top_p=0.8, top_k=5
        ),
        make_request("short", encode(PROMPTS[2]), max_new_tokens=3, sampling_seed=2),
        make_request("greedy", encode(PROMPTS[3]), max_new_tokens=12, temperature=0.0),
    ]
    outputs = engine.generate(requests)
    for request, output in zip(requests, outputs, strict=True):
        logits = full_forward_logits(reference_model, request.input_ids, output.output_ids)
        expected = (
            logits.log_softmax(-1).gather(-1, torch.tensor(output.output_ids)[:, None]).squeeze(-1)
        )
        assert output.output_token_logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_greedy_follows_argmax(
    engine: TransformersEngine, reference_model: PreTrainedModel, encode
) -> None:
    requests = [
        make_request(str(i), encode(p), max_new_tokens=10, temperature=0.0)
        for i, p in enumerate(PROMPTS)
    ]
    for request, output in zip(requests, engine.generate(requests), strict=True):
        logits = full_forward_logits(reference_model, request.input_ids, output.output_ids)
        assert output.output_ids == logits.argmax(-1).tolist()


def test_max_new_tokens_and_output_metadata(engine: TransformersEngine, encode) -> None:
    requests = [
        make_request(f"r{n}", encode(PROMPTS[1]), max_new_tokens=n, sampling_seed=n)
        for n in (1, 5, 9)
    ]
    outputs = engine.generate(requests)
    assert [output.rid for output in outputs] == ["r1", "r5", "r9"]
    for n, output in zip((1, 5, 9), outputs, strict=True):
        assert (
            len(output.output_ids) == len(output.output_token_logprobs) == output.completion_tokens
        )
        assert output.prompt_tokens == len(encode(PROMPTS[1]))
        assert output.weight_version == 1
        if output.finish_reason == "length":
            assert output.completion_tokens == n
        else:
            assert output.finish_reason == "stop" and output.output_ids[-1] == 0  # <eos>


def test_stop_token_ends_generation(engine: TransformersEngine, encode) -> None:
    params = {"max_new_tokens": 12, "sampling_seed": 5}
    (free,) = engine.generate([make_request("free", encode("1+1="), **params)])
    assert len(free.output_ids) >= 4
    stop_token = free.output_ids[3]
    (stopped,) = engine.generate(
        [make_request("stop", encode("1+1="), stop_token_ids=[stop_token], **params)]
    )
    first = free.output_ids.index(stop_token)
    assert stopped.output_ids == free.output_ids[: first + 1]
    assert stopped.finish_reason == "stop"


def test_stop_string_ends_generation_and_is_kept(engine: TransformersEngine, encode) -> None:
    params = {"max_new_tokens": 12, "sampling_seed": 4}
    (free,) = engine.generate([make_request("free", encode("12+34="), **params)])
    assert len(free.text) == len(free.output_ids) >= 6  # one char per token, no <eos>
    stop = free.text[3:5]
    (stopped,) = engine.generate(
        [make_request("stop", encode("12+34="), stop=["zzz", stop], **params)]
    )
    end = free.text.index(stop) + len(stop)
    assert stopped.text == free.text[:end]
    assert stopped.output_ids == free.output_ids[:end]
    assert stopped.finish_reason == "stop"


def test_eos_always_stops_and_is_not_in_text(build_model, tmp_path: Path, encode) -> None:
    model_dir = build_model(tmp_path)
    # A zero final norm makes every logit 0; greedy argmax then picks id 0, which is <eos>.
    state = load_file(model_dir / "model.safetensors")
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    engine = TransformersEngine(str(model_dir))
    (output,) = engine.generate(
        [make_request("eos", encode("1+1="), max_new_tokens=8, temperature=0.0)]
    )
    assert output.output_ids == [0]
    assert output.finish_reason == "stop"
    assert output.text == ""


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_update_weights_from_disk_matches_fresh_engine(
    build_model, tmp_path: Path, encode, tie_word_embeddings: bool
) -> None:
    base_dir = build_model(tmp_path / "base", tie_word_embeddings=tie_word_embeddings)
    engine = TransformersEngine(str(base_dir))
    model_before = engine._model
    requests = [
        make_request(str(i), encode(p), max_new_tokens=8, sampling_seed=i)
        for i, p in enumerate(PROMPTS)
    ]
    before = engine.generate(requests)

    perturbed = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    new_dir = tmp_path / "step-1"
    perturbed.save_pretrained(new_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (new_dir / name).write_bytes((base_dir / name).read_bytes())
    # save_pretrained drops the tied lm_head, so loading must cope with its absence.
    assert ("lm_head.weight" in load_file(new_dir / "model.safetensors")) is not tie_word_embeddings

    engine.update_weights_from_disk(str(new_dir), weight_version=7)
    after = engine.generate(requests)
    fresh = TransformersEngine(str(new_dir), weight_version=7).generate(requests)

    assert engine._model is model_before
    assert engine.weight_version() == 7
    assert all(output.weight_version == 7 for output in after)
    assert after[0].output_token_logprobs != pytest.approx(before[0].output_token_logprobs)
    assert [o.output_ids for o in after] == [o.output_ids for o in fresh]
    assert [o.output_token_logprobs for o in after] == [o.output_token_logprobs for o in fresh]


def test_update_weights_from_disk_loads_sharded_weights(
    build_model, tmp_path: Path, encode
) -> None:
    """Weights in several shards and an index (``trainer.max_shard_bytes``) load as one file
    does: the engine ends where a fresh engine on the same directory starts."""
    base_dir = build_model(tmp_path / "base")
    engine = TransformersEngine(str(base_dir))
    perturbed = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    new_dir = tmp_path / "step-1"
    perturbed.config.save_pretrained(new_dir)
    tensors = shards.unaliased(perturbed.state_dict())
    shards.write_weights(tensors.items(), new_dir, max_shard_bytes=1_000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (new_dir / name).write_bytes((base_dir / name).read_bytes())
    assert len(shards.weight_files(new_dir)) > 1

    engine.update_weights_from_disk(str(new_dir), weight_version=3)

    live = engine._model.state_dict()
    assert all(torch.equal(live[name], tensor) for name, tensor in tensors.items())
    requests = [
        make_request(str(i), encode(p), max_new_tokens=8, sampling_seed=i)
        for i, p in enumerate(PROMPTS)
    ]
    fresh = TransformersEngine(str(new_dir), weight_version=3).generate(requests)
    after = engine.generate(requests)
    assert [o.output_token_logprobs for o in after] == [o.output_token_logprobs for o in fresh]


def test_update_weights_rejects_a_mismatched_file(build_model, tmp_path: Path) -> None:
    model_dir = build_model(tmp_path / "base")
    engine = TransformersEngine(str(model_dir))
    state = load_file(model_dir / "model.safetensors")
    state["model.extra.weight"] = state.pop("model.norm.weight")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    save_file(state, bad_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]"
    ):
        engine.update_weights_from_disk(str(bad_dir), weight_version=2)
    assert engine.weight_version() == 0
    assert torch.equal(
        engine._model.model.norm.weight, state["model.extra.weight"]
    )  # nothing copied


def test_paused_engine_raises_until_continued(tiny_model_dir: Path, encode) -> None:
    engine = TransformersEngine(str(tiny_model_dir))
    request = make_request("r", encode("1+1="), max_new_tokens=2)
    engine.pause_generation()
    with pytest.raises(EnginePaused):
        engine.generate([request])
    assert engine.health()
    engine.continue_generation()
    assert len(engine.generate([request])[0].output_ids) >= 1


def test_health(engine: TransformersEngine) -> None:
    assert engine.health()
