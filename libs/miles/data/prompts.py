"""Rows become prompts: the prompt column (text, or chat messages rendered with the tokenizer's
chat template), the label column with its type, the other columns as the reward's metadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from miles.config import DataConfig
from miles.data.readers import DataError, Row

Render = Callable[[list[dict[str, Any]]], str]
"""Chat messages to the text the engine continues (the template's generation prompt added)."""


class Prompt(msgspec.Struct):
    prompt: str
    label: Any = ""
    metadata: dict[str, Any] = {}
    messages: list[dict[str, Any]] = []


def is_messages(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def to_prompt(row: object, where: str, data: DataConfig, render: Render | None) -> Prompt:
    """One row as a prompt, or a one-line error naming ``where`` and what to change."""
    key = data.prompt_key
    if not isinstance(row, dict) or key not in row:
        columns = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no {key!r} column (data.prompt_key); the row has {columns}")
    value = row[key]
    messages: list[dict[str, Any]] = []
    if is_messages(value):
        messages = list(value)
    elif not isinstance(value, str):
        raise DataError(
            f"{where}: {key!r} must be a string or chat messages [{{role, content}}], "
            f"not {type(value).__name__}"
        )
    elif data.chat_template == "on":
        messages = [{"role": "user", "content": value}]
    if messages and data.chat_template != "off":
        if render is None:
            raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
        text = render(messages)
    elif messages:
        raise DataError(
            f"{where}: {key!r} holds chat messages but data.chat_template='off': "
            "set it to 'auto' or give plain text"
        )
    else:
        text = value
    metadata = {k: v for k, v in row.items() if k != key}
    return Prompt(
        prompt=text, label=row.get(data.label_key, ""), metadata=metadata, messages=messages
    )


def to_prompts(found: Sequence[Row], data: DataConfig, render: Render | None) -> list[Prompt]:
    return [to_prompt(row, where, data, render) for where, row in found]


def chat_renderer(tokenizer: Any) -> Render | None:
    """``apply_chat_template(..., add_generation_prompt=True)`` of ``tokenizer``, or None when
    it has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, Any]]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    return render


def needs_template(found: Sequence[Row], data: DataConfig) -> bool:
    """Whether any row will be rendered with the chat template."""
    if data.chat_template == "off":
        return False
    if data.chat_template == "on":
        return True
    return any(isinstance(r, dict) and is_messages(r.get(data.prompt_key)) for _, r in found)
