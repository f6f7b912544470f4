"""Exact resume: a run killed with SIGKILL mid-training and resumed logs the same per-step losses afterwards as
an uninterrupted run: LoRA, full fine-tuning, QLoRA (NF4 base + paged 8-bit AdamW, on CPU), and a multi-stage recipe
killed during its second stage."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import read_metrics, tiny_recipe, kill_job


def _recipe_file(tmp_path, tiny_model_dir, small_sft_file, adapter_type, *, steps=20, save_every=5,
                 optimizer="adamw_torch", **eval_keys):
    recipe = tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": adapter_type},
                         train={"max_steps": steps, "batch_size": 2, "save_every": save_every, "lr": 1e-3,
                                "optimizer": optimizer},
                         eval={"baseline": False, "max_examples": 1, "max_new_tokens": 2, **eval_keys})
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
    kill_job(proc.pid)
    proc.wait()
    assert marker.exists()
    assert '"completed"' not in (killed / "status.json").read_text()  # really interrupted

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) and max(a) == 20
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_resume_of_completed_run_is_refused(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "lora")
    out = tmp_path / "done"
    subprocess.run([sys.executable, "-m", "tuneforge", "train", str(recipe), "--output", str(out), "--no-doctor",
                    "--set", "train.max_steps=2"], check=True, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "already completed" in proc.stderr


def _kill_when(cmd, marker, timeout=300):
    """Start `cmd`, SIGKILL its process group as soon as `marker` exists; return whether it did exist."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    kill_job(proc.pid)
    proc.wait()
    return marker.exists()


def _assert_same_losses(a, b, last_step):
    assert sorted(a) == sorted(b) and max(a) == last_step, (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_qlora_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, small_sft_file):
    """QLoRA with the recipe default optimizer (paged 8-bit AdamW): its quantized optimizer state resumes exactly."""
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "qlora", steps=6, save_every=2,
                          optimizer="paged_adamw_8bit", forgetting=False)
    cmd = [sys.executable, "-m", "tuneforge", "train", str(recipe), "--no-doctor"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + ["--output", str(straight)], check=True, capture_output=True, timeout=600)
    assert _kill_when(cmd + ["--output", str(killed)], killed / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    assert '"completed"' not in (killed / "status.json").read_text()
    assert not (killed / "checkpoints" / "checkpoint-6").exists()

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_losses(_losses(straight), _losses(killed), 6)


def test_multistage_killed_in_stage_two_resumes_stage_two_only(tmp_path, tiny_model_dir, small_sft_file):
    """stages: sft then dpo. Killed during dpo, `--resume PARENT` keeps the finished sft stage as it is (not
    retrained) and dpo's per-step losses match an uninterrupted run."""
    from pathlib import Path

    prefs = tmp_path / "prefs.jsonl"
    source = Path(__file__).resolve().parent.parent / "data" / "preference" / "train.jsonl"
    prefs.write_text("\n".join(source.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    raw = tiny_recipe(tiny_model_dir, small_sft_file,
                      train={"max_steps": 2, "batch_size": 2, "optimizer": "adamw_torch"},
                      eval={"baseline": False, "max_examples": 1, "max_new_tokens": 2, "forgetting": False,
                            "few_shot": 0})
    # No lr anywhere: sft gets 2e-4 and dpo 5e-6 (the defaults); the parent's saved recipe must keep it that way.
    raw["stages"] = [{"name": "sft", "method": "sft"},
                     {"name": "dpo", "method": "dpo", "data": {"train": str(prefs)},
                      "train": {"max_steps": 4, "save_every": 2, "scheduler": "constant"}}]
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "tuneforge", "train", str(recipe), "--no-doctor"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + ["--output", str(straight)], check=True, capture_output=True, timeout=600)
    assert _kill_when(cmd + ["--output", str(killed)], killed / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    assert json.loads((killed / "sft" / "status.json").read_text())["state"] == "completed"
    assert json.loads((killed / "dpo" / "status.json").read_text())["state"] != "completed"
    sft_files = {p.name: p.read_bytes() for p in (killed / "sft").rglob("*") if p.is_file()}

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (killed / "sft").rglob("*") if p.is_file()} == sft_files  # not retrained
    stages = json.loads((killed / "stages.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["completed", "completed"]
    from tuneforge.recipe import load_recipe

    assert [s.train.lr for s in load_recipe(killed / "recipe.yaml").stage_recipes()] == [2e-4, 5e-6]
    _assert_same_losses(_losses(straight / "dpo"), _losses(killed / "dpo"), 4)
    _assert_same_losses(_losses(straight / "sft"), _losses(killed / "sft"), 2)
