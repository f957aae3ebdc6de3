"""A character tokenizer with a chat template (the addition example's), built offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

TASK_PATH = Path(__file__).resolve().parents[3] / "examples" / "addition" / "task.py"


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    spec = importlib.util.spec_from_file_location("addition_task_for_data", TASK_PATH)
    assert spec is not None and spec.loader is not None
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    return task.build_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"), chat=True)
