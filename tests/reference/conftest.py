"""Makes verl importable for the parity tests in this folder, or skips them.

``make venv`` installs verl 0.9.1 without its dependencies (vLLM, flash-attn, ...) into
``.venv/reference``, outside site-packages, so that nothing but these tests sees it. The folder is
appended to the end of ``sys.path``: every package of the main venv is found first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# verl's wheel also ships a regular package named ``tests``. A regular package anywhere on the
# path wins over a namespace package, such as this repository's ``tests``, so pin ours in
# sys.modules before the folder is on the path.
import tests  # noqa: F401

REFERENCE = Path(sys.prefix) / "reference"
if str(REFERENCE) not in sys.path:
    sys.path.append(str(REFERENCE))

try:
    import verl.trainer.ppo.core_algos  # noqa: F401
except ImportError:
    MISSING: str | None = (
        "verl's core_algos is not importable: run make venv "
        "(pip install --no-deps verl into .venv/reference)"
    )
else:
    MISSING = None


class _Skipped(pytest.Module):
    def collect(self) -> list[pytest.Item]:
        pytest.skip(MISSING or "")


if MISSING is not None:
    # A conftest cannot skip at import when its folder is named on the command line, so each
    # test module of the folder is collected as a skip instead.
    def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
        return _Skipped.from_parent(parent, path=module_path)
