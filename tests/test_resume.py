"""Exact resume: a run killed with SIGKILL mid-training and resumed logs the same per-step losses afterwards as
an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import read_metrics, tiny_recipe


def _recipe_file(tmp_path, tiny_model_dir, small_sft_file, adapter_type):
    recipe = tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": adapter_type},
                         train={"max_steps": 60, "batch_size": 2, "save_every": 5, "lr": 1e-3,
                                "optimizer": "adamw_torch"},
                         eval={"baseline": False, "max_examples": 1, "max_new_tokens": 2})
    path = tmp_path / f"{adapter_type}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _losses(run_path):
    return {row["step"]: row["loss"] for row in read_metrics(run_path) if "loss" in row}


@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, small_sft_file, adapter_type):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, adapter_type)
    cmd = [sys.executable, "-m", "tuneforge", "train", str(recipe), "--no-doctor"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + ["--output", str(straight)], check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(cmd + ["--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = killed / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    assert '"completed"' not in (killed / "status.json").read_text()  # really interrupted

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) and max(a) == 60
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_resume_of_completed_run_is_refused(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "lora")
    out = tmp_path / "done"
    subprocess.run([sys.executable, "-m", "tuneforge", "train", str(recipe), "--output", str(out), "--no-doctor",
                    "--set", "train.max_steps=2"], check=True, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "already completed" in proc.stderr
