"""How `miles run` says a run ended before it finished: one line with why, and the command that
continues it, exactly as it can be pasted into a shell."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path("runs")
"""Where `miles run --resume` looks for the run when no ``--output-dir`` is given."""


def resume_command(args: argparse.Namespace, run_id: str, run_dir: Path) -> str:
    """`miles run --resume RUN_ID` with what it needs to do what this launch did:
    ``--output-dir`` when the run is not under ./runs (``run.output_dir`` or an earlier
    ``--output-dir``), the ``--set`` overrides given (reapplied on resume) and ``--quiet``.
    The recipe and ``--config`` are not repeated: a resume reads both back from the run dir."""
    argv = ["miles", "run", "--resume", run_id]
    if run_dir.parent != DEFAULT_OUTPUT_DIR.resolve():
        argv += ["--output-dir", str(run_dir.parent)]
    for override in args.overrides:
        argv += ["--set", override]
    if args.quiet:
        argv.append("--quiet")
    return shlex.join(argv)


def ending_line(why: str, resume: str) -> str:
    return f"miles: the run stopped: {why}. Continue it with: {resume}"
