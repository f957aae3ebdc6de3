"""The line a run that stopped early ends with: why, and a resume command that works when
pasted, whatever directory the run is in and whatever overrides it was given."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from miles.cli.ending import ending_line, resume_command
from miles.cli.main import build_parser


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_a_run_under_runs_resumes_with_its_id_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    args = parsed("recipe.py", "--run-id", "r1")
    assert resume_command(args, "r1", Path("/tmp/runs/r1")) == "miles run --resume r1"


def test_the_resume_finds_the_run_where_it_is_and_keeps_the_overrides(tmp_path: Path) -> None:
    output = tmp_path / "my runs"
    args = parsed(
        "recipe.py", "--config", "c.toml", "--set", f"run.output_dir='{output}'", "--quiet"
    )
    command = resume_command(args, "r2", output / "r2")

    assert shlex.split(command) == [
        "miles",
        "run",
        "--resume",
        "r2",
        "--output-dir",
        str(output),
        "--set",
        f"run.output_dir='{output}'",
        "--quiet",
    ]
    resumed = build_parser().parse_args(shlex.split(command)[1:])
    assert (resumed.resume, resumed.output_dir / "r2") == ("r2", output / "r2")


def test_the_ending_is_one_line() -> None:
    line = ending_line("Redis was unreachable for 121 s", "miles run --resume r3")
    assert line == (
        "miles: the run did not finish: Redis was unreachable for 121 s. "
        "Continue it with: miles run --resume r3"
    )
