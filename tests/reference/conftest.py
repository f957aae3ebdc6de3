"""Makes verl importable for the parity tests in this folder, or skips them.

``make venv`` installs verl 0.9.1 without its dependencies (vLLM, flash-attn, ...) into
``.venv/reference``, outside site-packages, so that nothing but these tests sees it. The folder
is on ``sys.path`` only while the modules the tests use are imported, then taken off again: verl's
wheel ships a regular package named ``tests``, which would shadow this repository's ``tests``
(a namespace package) in every process that inherits the path, such as Megatron's spawned ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Pin this repository's ``tests`` in sys.modules before the folder is on the path.
import tests  # noqa: F401

REFERENCE = Path(sys.prefix) / "reference"

sys.path.append(str(REFERENCE))
try:
    # Everything the tests reach, imported while the folder is on the path.
    import verl.trainer.config
    import verl.trainer.ppo.core_algos
    import verl.utils.torch_functional
    import verl.workers.config  # noqa: F401
except ImportError:
    MISSING: str | None = (
        "verl's core_algos is not importable: run make venv "
        "(pip install --no-deps verl into .venv/reference)"
    )
else:
    MISSING = None
finally:
    sys.path.remove(str(REFERENCE))


class _Skipped(pytest.Module):
    def collect(self) -> list[pytest.Item]:
        pytest.skip(MISSING or "")


if MISSING is not None:
    # A conftest cannot skip at import when its folder is named on the command line, so each
    # test module of the folder is collected as a skip instead.
    def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
        return _Skipped.from_parent(parent, path=module_path)
