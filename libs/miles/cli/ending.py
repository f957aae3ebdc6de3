"""How `miles run` says a run ended before it finished: one line with why, and the command that
continues it, exactly as it can be pasted into a shell."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from miles.runtime.run_record import RunRecord

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
    return f"miles: the run did not finish: {why}. Continue it with: {resume}"


def why_unfinished(record: RunRecord, steps: int) -> str | None:
    """Why the coordinator ended without finishing the run (None when it finished): every
    service exits 0 on a stop control event, so only the run record can tell."""
    if record.status == "finished":
        return None
    at = f"at step {record.step}/{steps}"
    if record.status == "stopped":
        return f"stopped by a stop control event {at} ({record.stop_reason})"
    if record.status == "drained":
        return f"drained by `miles drain` {at}, nothing in flight"
    return f"the coordinator exited {at} (run status {record.status!r})"
