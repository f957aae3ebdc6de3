"""A CPU inference engine on Hugging Face transformers: the model behind both ``EngineClient``s.

It is synchronous and owns its process's torch threads. ``sglang_server`` serves it over SGLang's
HTTP API (driven by ``SGLangClient``, as the rollout's engines are); ``InProcessClient`` serves
it to async callers in the same process.

It runs its own batched decode loop over a ``DynamicCache`` instead of ``model.generate``, for two
things RL needs that ``generate`` does not give: a per-request ``torch.Generator`` (the same
request yields the same tokens whatever else is in the batch) and the exact per-token logprob of
each sampled token (see ``sampling.sample_next_token``).

Prompts are left-padded; position ids come from the attention mask so a padded row computes the
same values as the prompt alone. Finished rows are dropped from the batch and the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from miles import shards
from miles.engine.protocol import GenerateOutput, GenerateRequest, SamplingParams
from miles.engine.sampling import sample_next_token


class EnginePaused(RuntimeError):
    """``generate`` was called between ``pause_generation`` and ``continue_generation``."""


@dataclass
class _Sequence:
    """One request's decoding state."""

    request: GenerateRequest
    generator: torch.Generator
    stop_token_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling_params


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # non-deterministic: an unseeded request is not meant to be reproducible
    else:
        generator.manual_seed(seed)
    return generator


class TransformersEngine:
    """A float32 causal LM on CPU that serves SGLang-shaped ``generate`` calls."""

    def __init__(
        self,
        model_path: str,
        threads: int = 2,
        weight_version: int = 0,
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        # Process-wide setting: this engine is meant to own its process (or Ray actor).
        torch.set_num_threads(threads)
        # transformers 5.x renamed ``torch_dtype`` to ``dtype`` (the old name still warns).
        self._model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch.float32,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        ).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path or model_path,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
        self._eos_token_id: int = self._tokenizer.eos_token_id
        # Padded positions are masked out, so any id will do when the tokenizer has no pad token.
        pad_token_id = self._tokenizer.pad_token_id
        self._pad_token_id: int = self._eos_token_id if pad_token_id is None else pad_token_id
        self._weight_names = set(self._model.state_dict())
        # Parameters that alias another one (tied ``lm_head.weight``): save_pretrained omits them,
        # and loading the parameter they alias fills them too.
        all_names = {name for name, _ in self._model.named_parameters(remove_duplicate=False)}
        unique_names = {name for name, _ in self._model.named_parameters()}
        self._tied_names = all_names - unique_names
        self._weight_version = weight_version
        self._paused = False

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        if self._paused:
            raise EnginePaused("generation is paused; retry after continue_generation()")
        return self._generate(requests)

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Copy ``model_path``'s weights (one file or shards: ``miles.shards``) into the live
        parameters, in place."""
        state = shards.read_weights(model_path)
        # Checked before copying anything, so a bad checkpoint leaves the served weights intact.
        missing = self._weight_names - state.keys() - self._tied_names
        unexpected = state.keys() - self._weight_names
        if missing or unexpected:
            raise ValueError(
                f"{model_path} does not match the served model: "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        # strict=False only because tied parameters may be absent; load_state_dict copies in
        # place, so the tie and the model object survive.
        self._model.load_state_dict(state, strict=False)
        self._weight_version = weight_version

    def pause_generation(self) -> None:
        self._paused = True

    def continue_generation(self) -> None:
        self._paused = False

    def weight_version(self) -> int:
        return self._weight_version

    def health(self) -> bool:
        """A one-token greedy generation succeeds; ignores the pause flag (paused is healthy)."""
        probe = GenerateRequest(
            rid="health",
            input_ids=[self._eos_token_id],
            sampling_params=SamplingParams(max_new_tokens=1, temperature=0.0),
        )
        return len(self._generate([probe])[0].output_ids) == 1

    @torch.inference_mode()
    def _generate(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        if not requests:
            return []
        sequences = [self._start(request) for request in requests]
        logits, cache, attention_mask, positions = self._prefill([r.input_ids for r in requests])
        active = list(range(len(sequences)))  # batch row -> index into ``sequences``
        while True:
            for row, index in enumerate(active):
                self._advance(sequences[index], logits[row])
            keep = [
                row for row, index in enumerate(active) if sequences[index].finish_reason is None
            ]
            if not keep:
                break
            if len(keep) < len(active):
                keep_rows = torch.tensor(keep)
                cache.batch_select_indices(keep_rows)
                attention_mask, positions = attention_mask[keep_rows], positions[keep_rows]
                active = [active[row] for row in keep]
            input_ids = torch.tensor([[sequences[index].output_ids[-1]] for index in active])
            attention_mask = torch.cat([attention_mask, torch.ones_like(positions)], dim=1)
            positions = positions + 1
            logits = self._model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
        return [self._output(sequence) for sequence in sequences]

    def _start(self, request: GenerateRequest) -> _Sequence:
        params = request.sampling_params
        sequence = _Sequence(
            request=request,
            generator=_generator(params.sampling_seed),
            stop_token_ids=frozenset([*params.stop_token_ids, self._eos_token_id]),
        )
        if params.max_new_tokens <= 0:
            sequence.finish_reason = "length"
        return sequence

    def _prefill(
        self, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the left-padded prompts: last-position logits, the cache, mask and last positions."""
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        # Real tokens get positions 0..len-1 whatever their padding; pads get 0 and are masked.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        # transformers 5.x calls the KV cache ``cache`` (``past_key_values`` is a deprecated alias).
        cache = DynamicCache(config=self._model.config)
        logits = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return logits, cache, attention_mask, position_ids[:, -1:]

    def _advance(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Sample one token for an unfinished sequence and decide whether it is finished."""
        if sequence.finish_reason is not None:
            return
        token, logprob = sample_next_token(logits, sequence.params, sequence.generator)
        sequence.output_ids.append(token)
        sequence.logprobs.append(logprob)
        if token in sequence.stop_token_ids or self._hit_stop_string(sequence):
            sequence.finish_reason = "stop"
        elif len(sequence.output_ids) >= sequence.params.max_new_tokens:
            sequence.finish_reason = "length"

    def _hit_stop_string(self, sequence: _Sequence) -> bool:
        # Decoding the whole output each step is quadratic, but stop strings can span tokens and
        # outputs here are short; the stop string is kept in the output, as with SGLang's
        # ``no_stop_trim=True``.
        if not sequence.params.stop:
            return False
        text = self._tokenizer.decode(sequence.output_ids, skip_special_tokens=True)
        return any(stop in text for stop in sequence.params.stop)

    def _output(self, sequence: _Sequence) -> GenerateOutput:
        assert sequence.finish_reason is not None
        return GenerateOutput(
            rid=sequence.request.rid,
            output_ids=sequence.output_ids,
            text=str(self._tokenizer.decode(sequence.output_ids, skip_special_tokens=True)),
            output_token_logprobs=sequence.logprobs if sequence.request.return_logprob else [],
            finish_reason=sequence.finish_reason,
            weight_version=self._weight_version,
            prompt_tokens=len(sequence.request.input_ids),
            completion_tokens=len(sequence.output_ids),
        )
