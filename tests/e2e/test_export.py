"""The model you get out: `miles run` of the demo leaves runs/<id>/final/, a Hugging Face model
with its tokenizer that transformers loads and generates with; `miles export` writes any step
the blob store still holds, after the run's embedded NATS and Redis are gone, and says in one
line when a step was collected. The blob store holds only the steps trainer.keep_checkpoints
and the engines' window keep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "examples" / "addition" / "recipe.py"
STEPS = 3


def miles(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "miles.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("blob_store", ["dir", "nats"])
def test_a_finished_run_leaves_its_model_and_exports_the_steps_it_kept(
    tmp_path: Path, ray_cluster: str, blob_store: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL")}
    env["RAY_ADDRESS"] = ray_cluster
    run_id = f"export-{blob_store}"
    settings = [
        f"run.steps={STEPS}",
        f"run.output_dir='{tmp_path}'",
        f"infra.blob_store='{blob_store}'",
        "trainer.keep_checkpoints=1",
        "buffer.max_staleness=0",
        "data.eval_size=20",
        "coordinator.eval_every=100",
    ]
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    done = miles("run", str(RECIPE), "--quiet", "--run-id", run_id, *overrides, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / run_id
    final = run_dir / "final"
    assert json.loads((run_dir / "summary.json").read_text())["model"] == str(final)
    assert (
        f"model: {final}" in done.stdout and "AutoModelForCausalLM.from_pretrained" in done.stdout
    )

    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    prompt = tokenizer("12+34=", return_tensors="pt")
    answer = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert answer.shape[1] > prompt.input_ids.shape[1]  # it generates, and stops at EOS or 4
    assert json.loads((final / "miles_export.json").read_text())["step"] == STEPS

    if blob_store == "dir":  # the engines' window (max_staleness + 2) and one full checkpoint
        blobs = run_dir / "blobs"
        assert sorted(p.name.split("-")[0] for p in (blobs / "weights").iterdir()) == ["v2", "v3"]
        assert [p.name.split("-")[0] for p in (blobs / "state").iterdir()] == ["s3"]

    # After the run: its NATS and Redis are gone; steps.jsonl and the blob store remain.
    args = ["export", run_id, "--output-dir", str(tmp_path)]
    step2 = miles(*args, "--step", "2", "--dtype", "fp32", env=env)
    assert step2.returncode == 0, step2.stdout + step2.stderr
    assert f"step 2 of run {run_id} (fp32) -> {run_dir / 'step-2'}" in step2.stdout
    exported = load_file(str(run_dir / "step-2" / "model.safetensors"))
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert {t.dtype for t in exported.values()} == {torch.float32}
    if blob_store == "dir":  # bit for bit the trainer's weights of step 2
        trained = Path(steps[1]["weights_uri"].removeprefix("file://")) / "model.safetensors"
        reference = load_file(str(trained))
        assert exported.keys() == reference.keys()
        assert all(torch.equal(exported[name], reference[name]) for name in reference)

    step1 = miles(*args, "--step", "1", env=env)
    assert step1.returncode == 2
    assert step1.stderr.strip().splitlines()[-1] == (
        f"miles: step 1 of run {run_id} is no longer in the blob store: the trainer keeps the "
        "last 1 step(s) (trainer.keep_checkpoints; 0 keeps all); `final/` holds the last"
    )
