"""End to end on the embedded SmolLM2-135M-Instruct: the quickstart recipe, shortened, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _first_records(source: str, path: Path, n: int = 8) -> Path:
    """The first n records of data/<source>/eval.jsonl, written to path (a CI-sized held-out set)."""
    lines = (ROOT / "data" / source / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_quickstart_short_run_learns(tmp_path):
    """The quickstart recipe through the CLI, CI-sized: 4 steps, 8 held-out records (the held-out loss is computed
    over the whole eval file before and after training: the shipped 60 records took a quarter of the test), and
    without the general-ability probe (536 items scored twice, a third of the test; the probe itself is tested on
    the tiny model: test_training.py, test_forgetting.py)."""
    out = tmp_path / "qs"
    eval_file = _first_records("quickstart", tmp_path / "eval.jsonl")
    sizes = ["train.max_steps=4", "data.max_examples=80", f"data.eval={eval_file}", "eval.max_examples=8",
             "eval.forgetting=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(out),
         *[arg for size in sizes for arg in ("--set", size)]],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    # Bounds, not exact values: held-out loss falls by at least 5% after four steps.
    assert summary["eval_loss"]["tuned"] < 0.95 * summary["eval_loss"]["base"]
    assert "held-out results" in proc.stdout and "exact_match" in proc.stdout
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_qlora_sft_then_dpo_recipe_on_the_embedded_model(tmp_path):
    """recipes/qlora-sft-dpo.yaml (seed 000 step 12) end to end on the embedded model, CI-sized: two QLoRA SFT steps,
    then two DPO steps continuing that adapter; both stages finish, the DPO stage starts from the SFT adapter and
    reports held-out preference accuracy before and after. Each stage's held-out set is cut to its first 8 records:
    the trainer's held-out loss runs over the whole set before and after each stage, and on a CPU a 4-bit forward is
    slow (with the shipped 60 + 60 records those four passes took 200 of the test's 300 s)."""
    out = tmp_path / "pref"
    small = {"sft": _first_records("quickstart", tmp_path / "sft-eval.jsonl"),
             "dpo": _first_records("preference", tmp_path / "dpo-eval.jsonl")}
    sizes = [f"data.eval={small['sft']}", f"stages.1.data.eval={small['dpo']}",
             "train.max_steps=2", "train.batch_size=4", "train.grad_accum=1", "data.max_examples=40",
             "eval.max_examples=4", "eval.max_new_tokens=8", "stages.1.train.max_steps=2", "stages.1.train.batch_size=2",
             "stages.1.train.grad_accum=1", "stages.1.eval.max_examples=4", "stages.1.eval.max_new_tokens=8",
             "preference.eval_pairs=8"]
    args = [arg for size in sizes for arg in ("--set", size)]
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(ROOT / "recipes" / "qlora-sft-dpo.yaml"),
                           "--output", str(out), *args], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["sft", "dpo"]
    for stage in ("sft", "dpo"):
        assert json.loads((out / stage / "status.json").read_text())["state"] == "completed"
        assert (out / stage / "adapter" / "adapter_model.safetensors").exists()
    dpo_recipe = (out / "dpo" / "recipe.yaml").read_text()
    assert "qlora" in dpo_recipe and str(out / "sft") in dpo_recipe  # QLoRA, continuing the SFT stage's adapter
    preference = json.loads((out / "dpo" / "eval" / "preference.json").read_text())
    assert preference["before"]["n"] == preference["after"]["n"] == 8
    assert preference["before"]["implicit_reward"] == 50.0  # the start model is the reference
