"""`miles run` of a recipe as the e2e tests run it: a subprocess with embedded NATS and Redis
(and, given ``ray_address``, the session's Ray: a Ray head per run would cost each about 6 s),
its output dir under the test's tmp_path; what it left behind, read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Finished:
    run_dir: Path
    stdout: str
    summary: dict[str, Any]
    steps: list[dict[str, Any]]


def miles_run(
    recipe: Path,
    output_dir: Path,
    run_id: str,
    *overrides: str,
    steps: int | None = None,
    ray_address: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
) -> Finished:
    """Run ``recipe`` to the end (``steps`` steps, evaluated before and after, when given) and
    require it to succeed. The environment's servers and exporters are not inherited: each
    run starts its own; ``env`` adds variables."""
    command = [sys.executable, "-m", "miles.cli", "run", str(recipe), "--quiet"]
    command += ["--run-id", run_id, "--set", f"run.output_dir='{output_dir}'"]
    if steps is not None:
        command += ["--set", f"run.steps={steps}", "--set", f"coordinator.eval_every={steps}"]
    command += overrides
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "REDIS_URL", "RAY_ADDRESS", "WANDB_DIR")
        and not k.startswith("OTEL_")
    }
    if ray_address is not None:
        inherited["RAY_ADDRESS"] = ray_address
    done = subprocess.run(
        command, env=inherited | dict(env or {}), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = output_dir / run_id
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return Finished(
        run_dir=run_dir,
        stdout=done.stdout,
        summary=json.loads((run_dir / "summary.json").read_text()),
        steps=[json.loads(line) for line in lines],
    )
