"""Run ids become NATS subject tokens and Redis keys: they are checked where they enter."""

from __future__ import annotations

import pydantic
import pytest

from miles.cli.main import main
from miles.config import RunConfig
from miles.runtime.subjects import Subjects, check_run_id


@pytest.mark.parametrize("run_id", ["a.b", "run*", "x>", "has space", "", "x" * 65])
def test_a_run_id_that_would_change_subjects_is_refused(run_id: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        check_run_id(run_id)


def test_a_valid_run_id_is_one_subject_token() -> None:
    run_id = check_run_id("addition-20261201-080000-ab12")
    assert Subjects(run_id).tasks.split(".") == ["miles", run_id, "tasks"]


@pytest.mark.parametrize("command", ["run", "serve"])
def test_the_cli_refuses_a_bad_run_id_in_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {
        "run": ["run", "recipe.py", "--run-id", "my.run"],
        "serve": ["serve", "rollout", "--recipe", "recipe.py", "--run-id", "my.run"],
    }[command]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--run-id: run id 'my.run' must be 1-64 characters of [A-Za-z0-9_-]" in error


def test_resume_refuses_a_bad_run_id(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--resume", "runs/x.y"])
    assert "--resume: run id 'runs/x.y'" in capsys.readouterr().err


def test_run_name_must_make_a_valid_run_id() -> None:
    with pytest.raises(pydantic.ValidationError, match="String should match pattern"):
        RunConfig(name="gsm8k-qwen2.5")
    longest = RunConfig(name="n" * 40).name
    check_run_id(f"{longest}-20261201-080000-ab12")  # what `miles run` derives from it
