"""Experiment trackers: Weights & Biases and TensorBoard behind one small interface.

`miles run` (or `miles track RUN`) feeds them from the run record, so what they show is what
``steps.jsonl`` and ``summary.json`` hold, whichever machine the services ran on. Both are off
by default (``tracking.wandb``, ``tracking.tensorboard``); each is imported only when used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from miles.config import TrackingConfig


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def table(
        self, step: int, name: str, columns: Sequence[str], rows: Sequence[list[Any]]
    ) -> None: ...

    def close(self) -> None: ...


class WandbTracker:
    """One wandb run per miles run (its id is the run id, so `--resume` continues it)."""

    def __init__(
        self, tracking: TrackingConfig, run_id: str, run_dir: Path, config: Mapping[str, Any]
    ) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=tracking.project or os.environ.get("WANDB_PROJECT") or "miles",
            entity=tracking.entity or os.environ.get("WANDB_ENTITY"),
            name=run_id,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            config=dict(config),
        )
        # An evaluation lands after later steps were logged, and wandb's step only moves
        # forward: evaluations get their own x axis, the step they measured.
        self.run.define_metric("eval/after_step")
        self.run.define_metric("eval/*", step_metric="eval/after_step")
        self.last_step = -1

    def log(self, step: int, values: Mapping[str, float]) -> None:
        row: dict[str, Any] = dict(values)
        if any(key.startswith("eval/") for key in row):
            row["eval/after_step"] = step
        self._log(step, row)

    def table(
        self, step: int, name: str, columns: Sequence[str], rows: Sequence[list[Any]]
    ) -> None:
        table = self._wandb.Table(columns=list(columns), data=list(rows))
        self._log(step, {name: table, "eval/after_step": step})

    def _log(self, step: int, row: dict[str, Any]) -> None:
        self.last_step = max(self.last_step, step)
        self.run.log(row, step=self.last_step)  # a late evaluation joins the current step

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Scalars per step, and each table as a markdown text summary."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def table(
        self, step: int, name: str, columns: Sequence[str], rows: Sequence[list[Any]]
    ) -> None:
        def cell(value: Any) -> str:
            return str(value).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_trackers(
    tracking: TrackingConfig, run_id: str, run_dir: Path, config: Mapping[str, Any]
) -> list[Tracker]:
    trackers: list[Tracker] = []
    if tracking.wandb:
        trackers.append(WandbTracker(tracking, run_id, run_dir, config))
    if tracking.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    return trackers
