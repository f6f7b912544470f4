"""method: dft (methods/dft.py) on the tiny model: it trains through the one life of a run, its loss is TRL's DFT
loss (the token-probability-weighted NLL, below SFT's on the same weights), and the shipped recipe loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console

from conftest import read_metrics, tiny_recipe
from tuneforge.recipe import load_recipe, parse_recipe
from tuneforge.train import train

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, model_dir, data_file, method):
    raw = tiny_recipe(model_dir, data_file, method=method, train={"max_steps": 2, "batch_size": 2, "lr": 1e-3},
                      eval={"baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 2,
                            "max_new_tokens": 4})
    return train(parse_recipe(raw), output=str(tmp_path / method), console=Console(quiet=True), doctor=False)


def test_dft_trains_with_the_probability_weighted_loss(tmp_path, tiny_model_dir, small_sft_file):
    dft, sft = (_run(tmp_path, tiny_model_dir, small_sft_file, m) for m in ("dft", "sft"))
    assert dft.status == "completed" and (dft.path / "adapter" / "adapter_model.safetensors").exists()
    first = {run: [r["loss"] for r in read_metrics(run.path) if "loss" in r and not r.get("final")] for run in (dft, sft)}
    assert len(first[dft]) == 2 and all(math.isfinite(v) for v in first[dft])
    # Step 1 sees the same weights and batch: DFT multiplies each token's NLL by p(token) < 1, so its loss is smaller
    # (a random tiny model gives p ~ 1/vocab: the DFT loss is near 0 while SFT's is ~ln(vocab)).
    assert first[dft][0] < 0.1 * first[sft][0]
    assert json.loads((dft.path / "summary.json").read_text())["trainable_params"] == 32768


def test_dft_recipe_loads_with_sft_defaults():
    recipe = load_recipe(ROOT / "recipes" / "dft.yaml")
    assert recipe.method == "dft" and recipe.train.lr == 2e-4
