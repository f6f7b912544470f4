"""Claims the README makes that had no test (issue #20): each is exercised here on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import read_metrics, run_cli, tiny_recipe
from tuneforge.recipe import parse_recipe
from tuneforge.train import train

QUICK_EVAL = {"max_examples": 2, "max_new_tokens": 4, "batch_size": 2, "few_shot": 0, "forgetting": False}


def _train(tmp_path, tiny_model_dir, small_sft_file, name="run", **sections):
    from rich.console import Console

    sections.setdefault("eval", QUICK_EVAL)
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, **sections))
    return train(recipe, output=str(tmp_path / name), console=Console(record=True, width=200), doctor=False)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, tiny_model_dir, small_sft_file):
    return _train(tmp_path_factory.mktemp("claims"), tiny_model_dir, small_sft_file, train={"max_steps": 2}).path


@pytest.mark.parametrize("quant", [{"bits": 4, "type": "fp4"}, {"bits": 8}])
def test_qlora_with_fp4_and_8_bit_bases(tmp_path, tiny_model_dir, small_sft_file, quant):
    """quant.type fp4 and quant.bits 8 (README: QLoRA base quantization) train and score."""
    run = _train(tmp_path, tiny_model_dir, small_sft_file, adapter={"type": "qlora"}, quant=quant,
                 train={"max_steps": 2, "lr": 1e-3})
    assert run.status == "completed"
    saved = yaml.safe_load((run.path / "recipe.yaml").read_text())
    assert {k: saved["quant"][k] for k in quant} == quant
    losses = [r["loss"] for r in read_metrics(run.path) if "loss" in r]
    assert losses and all(loss == loss for loss in losses)
    assert (run.path / "adapter" / "adapter_model.safetensors").exists()


def test_early_stopping_through_a_recipe(tmp_path, tiny_model_dir, small_sft_file):
    """train.early_stopping in a recipe: with learning rate 0 the held-out loss is flat, so patience 1 stops the run
    at the second evaluation instead of step 20, and the run says so."""
    run = _train(tmp_path, tiny_model_dir, small_sft_file,
                 train={"max_steps": 20, "lr": 1e-12, "eval_every": 1, "scheduler": "constant",
                        "early_stopping": {"patience": 1, "min_delta": 0.01}})
    assert run.status == "completed"
    stopped = run.read_json("eval/early_stopping.json")
    assert stopped["stopped_at_step"] == 2, stopped
    assert stopped["best_step"] == 1 and stopped["restored"].endswith("checkpoint-1")  # the best weights, not the last
    assert max(r["step"] for r in read_metrics(run.path) if "step" in r) == 2


def test_data_preview_command_marks_loss_tokens(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file)), encoding="utf-8")
    code, out = run_cli(monkeypatch, capsys, "data", "preview", str(recipe), "-n", "1", with_stdout=True)
    assert code == 0, out
    assert "loss" in out.lower() and "<|im_start|>" in out


def test_chat_command_answers_each_line_until_an_empty_one(done_run):
    from typer.testing import CliRunner

    from tuneforge.cli import app

    result = CliRunner().invoke(app, ["chat", str(done_run), "--max-new-tokens", "3"], input="hello\nagain\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("model>") == 2


def test_eval_merge_generate_refuse_a_run_that_did_not_complete(tmp_path, monkeypatch, capsys, done_run):
    run = tmp_path / "failed"
    shutil.copytree(done_run, run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "failed"}), encoding="utf-8")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    for args in (["eval", str(run), "--data", str(data)], ["generate", str(run), "--prompt", "hi"],
                 ["merge", str(run), "--output", str(tmp_path / "merged")]):
        code, out = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and "did not complete (status: failed)" in out, (args, out)
    assert not (tmp_path / "merged").exists()


def test_use_vllm_without_vllm_is_refused_before_training(tmp_path, tiny_model_dir):
    import importlib.util

    from tuneforge.errors import RecipeError

    assert importlib.util.find_spec("vllm") is None  # this machine has no vLLM: the refusal path is what runs here
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": i}) + "\n" for i in range(8)))
    recipe = tiny_recipe(tiny_model_dir, prompts, method="grpo", eval=QUICK_EVAL,
                         rl={"rewards": [{"name": "exact_answer"}], "use_vllm": True, "num_generations": 2,
                             "max_new_tokens": 4})
    with pytest.raises(RecipeError, match="vllm is not installed"):
        train(parse_recipe(recipe), output=str(tmp_path / "grpo"), doctor=False)
