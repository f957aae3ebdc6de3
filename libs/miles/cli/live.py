"""The live view of `miles run`: a rich table on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from miles.runtime.run_view import RunView


class LiveView:
    def __init__(self, run_id: str, steps: int, quiet: bool) -> None:
        self.run_id = run_id
        self.steps = steps
        self.console = Console()
        self.interactive = self.console.is_terminal and not quiet
        self.live = Live(console=self.console, refresh_per_second=2) if self.interactive else None
        self.last_step = 0
        self.last_eval = 0

    def __enter__(self) -> LiveView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live:
            self.live.__exit__(kind, value, tb)

    def log(self, message: str) -> None:
        self.console.print(f"[yellow]miles:[/] {escape(message)}")

    def update(self, view: RunView) -> None:
        if self.live:
            self.live.update(self._table(view))
            return
        for result in view.evals[self.last_eval :]:
            print(
                f"eval after step {result.after_step}: held-out accuracy {result.accuracy:.3f}",
                flush=True,
            )
        self.last_eval = len(view.evals)
        if view.step != self.last_step:
            for manifest in view.steps[self.last_step :]:
                seconds = " ".join(f"{k}={v:.2f}s" for k, v in manifest.seconds.items())
                print(
                    f"step {manifest.step}/{self.steps} reward {manifest.reward_mean:.3f} "
                    f"loss {manifest.metrics['loss']:+.4f} {seconds}",
                    flush=True,
                )
            headline = view.headline()  # the same values as `miles status`
            print(
                f"  bleed: trainer waiting for data {headline['bleed: trainer waiting for data']}"
                f", rollout waiting for weights {headline['bleed: rollout waiting for weights']}",
                flush=True,
            )
            self.last_step = view.step

    def _table(self, view: RunView) -> Table:
        table = Table(title=f"miles run {self.run_id}", expand=False)
        headline = view.headline()  # the same rows as `miles status`
        for column in (
            "step",
            "reward mean",
            "held-out acc",
            "samples/s",
            "wait s",
            "train s",
            "save s",
            "bleed trainer",
            "bleed rollout",
            "filtered",
        ):
            table.add_column(column, justify="right")
        last = view.steps[-1] if view.steps else None
        accuracy = view.accuracy()
        seconds = last.seconds if last else {}
        table.add_row(
            f"{view.step}/{self.steps}",
            f"{last.reward_mean:.3f}" if last else "-",
            f"{accuracy:.3f}" if accuracy is not None else "-",
            f"{view.samples_per_second():.1f}",
            f"{seconds.get('wait_for_batch', 0):.2f}",
            f"{seconds.get('train', 0):.2f}",
            f"{seconds.get('save_weights', 0):.2f}",
            headline["bleed: trainer waiting for data"],
            headline["bleed: rollout waiting for weights"],
            str(sum(view.filtered.values())),
        )
        table.caption = f"seconds per phase: {headline['seconds per phase']}"
        services = view.service_seconds()
        if services:
            table.caption += "\nwaiting share: " + ", ".join(
                f"{name} {entry['waiting_share']:.0%}" for name, entry in sorted(services.items())
            )
        return table

    @staticmethod
    def final(summary: dict[str, Any], run_dir: Path, loading: str | None = None) -> None:
        """The run's outcome; ``loading``: the lines that load the exported model."""
        console = Console(file=sys.stdout)
        table = Table(title="held-out accuracy")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        table.add_column("steps", justify="right")
        table.add_column("wall s", justify="right")
        table.add_column("samples/s", justify="right")
        before, after = summary["accuracy_before"], summary["accuracy_after"]
        table.add_row(
            "-" if before is None else f"{before:.3f}",
            "-" if after is None else f"{after:.3f}",
            str(summary["steps"]),
            f"{summary['wall_seconds']:.0f}",
            f"{summary['samples_per_second']:.1f}",
        )
        console.print(table)
        console.print(f"summary: {run_dir / 'summary.json'}")
        if loading:  # unwrapped, to copy and paste
            console.print(f"model: {summary['model']}, loaded by", soft_wrap=True)
            console.print(escape(loading), highlight=False, soft_wrap=True)
