"""Numerical faults stop the run with the step named; Ctrl-C saves a checkpoint and the run resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import yaml

from conftest import tiny_recipe


def _write(tmp_path, recipe, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_nan_loss_stops_with_the_step_named(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _write(tmp_path, tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "full"},
                                          train={"max_steps": 6, "lr": 1e30, "scheduler": "constant",
                                                 "max_grad_norm": 1e30},
                                          eval={"baseline": False}))
    out = tmp_path / "nan"
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(recipe), "--output", str(out), "--no-doctor"],
                          capture_output=True, text=True, timeout=600, env={"COLUMNS": "300", **_env()})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "at step" in proc.stderr and "lower train.lr" in proc.stderr and "Traceback" not in proc.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed"


def test_ctrl_c_saves_checkpoint_then_resume_finishes(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _write(tmp_path, tiny_recipe(tiny_model_dir, small_sft_file,
                                          train={"max_steps": 40, "batch_size": 2},
                                          eval={"baseline": False, "max_examples": 1, "max_new_tokens": 2}))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(recipe), "--output", str(out), "--no-doctor"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted" and 3 <= status["step"] < 40
    assert (out / "checkpoints" / f"checkpoint-{status['step']}" / "trainer_state.json").exists()
    assert "--resume" in stdout

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(out),
                              ], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def _env():
    import os

    return dict(os.environ)
