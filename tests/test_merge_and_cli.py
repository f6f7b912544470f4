"""Merge equivalence (LoRA and QLoRA) and the eval / generate / merge commands on a finished tiny run."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import tiny_recipe
from tuneforge.cli import app
from tuneforge.recipe import parse_recipe
from tuneforge.train import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, small_sft_file):
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 3, "lr": 1e-2}))
    return train(recipe, output=str(tmp_path_factory.mktemp("lora") / "run"), console=Console(quiet=True), doctor=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_matches_base_plus_adapter(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_target
    from tuneforge.ops.merge import merge_run

    adapted, tokenizer = load_target(str(lora_run.path))
    ids = torch.tensor([tokenizer("Extract the order as JSON, please: Anna from Oslo wants 3 mugs.")["input_ids"]])
    merged_dir = merge_run(str(lora_run.path), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (merged_dir / "chat_template.jinja").exists()
    expected = _logits(adapted, ids)
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-4)
    # and the adapter really changed the model, so the comparison means something
    with adapted.disable_adapter():
        assert not torch.allclose(_logits(adapted, ids), expected, atol=1e-3)


def test_qlora_merge_uses_unquantized_base(tmp_path, tiny_model_dir, small_sft_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.ops.merge import merge_run

    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "qlora"},
                                      train={"max_steps": 2, "lr": 1e-2, "optimizer": "adamw_torch"},
                                      eval={"baseline": False}))
    run = train(recipe, output=str(tmp_path / "qrun"), console=Console(quiet=True), doctor=False)
    merged_dir = merge_run(str(run.path), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run.path / "adapter"))
    ids = torch.tensor([[1, 200, 300, 400, 500, 2]])
    assert torch.allclose(_logits(merged, ids), _logits(reference, ids), atol=1e-4)


def test_merge_refuses_to_overwrite(lora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["merge", str(lora_run.path), "--output", str(out)])
    assert result.exit_code != 0
    assert (out / "keep.txt").read_text() == "mine"


def test_eval_and_generate_commands(lora_run, tmp_path, small_sft_file):
    out = tmp_path / "scores.json"
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(lora_run.path), "--data", str(small_sft_file), "--max-examples", "3",
                                 "--max-new-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert scores["n"] == 3 and "exact_match" in scores["metrics"]
    result = runner.invoke(app, ["generate", str(lora_run.path), "--prompt", "hello", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


def test_train_rejects_bad_recipe_without_traceback(tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\ndata:\n  train: nowhere.jsonl\ntrain:\n  lr: 1e-4\n  epochz: 2\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.epochz" in proc.stderr and "did you mean `train.epochs`" in proc.stderr
    assert "bad.yaml:6" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
