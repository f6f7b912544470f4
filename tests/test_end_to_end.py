"""End to end on the embedded SmolLM2-135M-Instruct: the quickstart recipe, shortened, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_short_run_learns(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", str(ROOT / "recipes" / "quickstart.yaml"), "--output", str(out),
         "--set", "train.max_steps=4", "--set", "data.max_examples=80", "--set", "eval.max_examples=8"],
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
