"""A character tokenizer with a chat template (the addition example's), built offline."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="session")
def chat_tokenizer(addition_task: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return addition_task.build_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"), chat=True)
