"""LoRA, QLoRA and full fine-tuning steps on a tiny random model: the run directory, counts and losses."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from conftest import read_metrics, tiny_recipe
from tuneforge.recipe import parse_recipe
from tuneforge.train import train


def run_tiny(tmp_path, tiny_model_dir, small_sft_file, **sections):
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, **sections))
    console = Console(record=True, width=200)
    run = train(recipe, output=str(tmp_path / "run"), console=console, doctor=False)
    return run, console.export_text()


def test_lora_run_directory_and_trainable_count(tmp_path, tiny_model_dir, small_sft_file):
    run, output = run_tiny(tmp_path, tiny_model_dir, small_sft_file, eval={"forgetting": True})
    files = {p.name for p in run.path.iterdir()}
    assert {"recipe.yaml", "environment.json", "status.json", "metrics.jsonl", "data_stats.json", "adapter", "eval",
            "summary.json"} <= files
    assert run.status == "completed"
    adapter = {p.name for p in (run.path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= adapter
    assert "model.safetensors" not in adapter  # adapter-only saving
    # r=16 on all 7 linear projections of 2 layers (hidden 64, kv 32, mlp 128): 2 * 16 * (128+96+96+128+192+192+192)
    assert "trainable params: 32,768" in output
    losses = [row["loss"] for row in read_metrics(run.path) if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    summary = run.read_json("summary.json")
    assert summary["steps"] == 3
    assert set(summary["metrics"]["exact_match"]) == {"base", "few_shot", "tuned", "tuned_vs_base", "tuned_vs_few_shot"}
    versus = summary["metrics"]["exact_match"]["tuned_vs_base"]  # every delta carries its 95% interval
    assert versus["ci95"][0] <= versus["delta"] <= versus["ci95"][1] and versus["n"] == summary["n_eval"]
    loss = summary["eval_loss"]
    assert loss["ci95"][0] <= loss["tuned"] - loss["base"] <= loss["ci95"][1]
    # one held-out pass per model: the reported losses are the per-token means of the per-example losses the
    # interval is computed from, and metrics.jsonl has them at step 0 and at the end
    per_example = run.read_json("eval/loss_examples.json")
    for key in ("base", "tuned"):
        rows = per_example[key]
        assert rows and sum(n for _, n in rows) > 0
        assert loss[key] == pytest.approx(sum(s for s, _ in rows) / sum(n for _, n in rows), rel=1e-12)
    assert loss["delta"] == pytest.approx(loss["tuned"] - loss["base"], rel=1e-9)
    evals = [row for row in read_metrics(run.path) if "eval_loss" in row]
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == loss["base"]
    assert evals[-1]["final"] and evals[-1]["eval_loss"] == loss["tuned"] and len(evals) == 2
    assert {"baseline.json", "few_shot.json", "tuned.json", "forgetting.json", "contamination.json"} <= {
        p.name for p in (run.path / "eval").iterdir()}
    forgetting = run.read_json("eval/forgetting.json")
    assert forgetting["before"]["n"] == forgetting["after"]["n"] > 0 and "flagged" in forgetting["comparison"]
    assert (run.path / "report.html").exists() and list((run.path / "plots").glob("*.png"))
    # TensorBoard by default, into the run directory, with the same losses metrics.jsonl has
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run.path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in <run>/tensorboard"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    logged = [event.value for event in accumulator.Scalars("train/loss")]
    assert logged == pytest.approx(losses, rel=1e-5)


def test_full_finetune_loss_falls(tmp_path, tiny_model_dir, small_sft_file):
    run, output = run_tiny(tmp_path, tiny_model_dir, small_sft_file, adapter={"type": "full"},
                           train={"max_steps": 8, "lr": 3e-3, "scheduler": "constant"})
    assert (run.path / "model" / "model.safetensors").exists()
    assert not (run.path / "adapter").exists()
    losses = [row["loss"] for row in read_metrics(run.path) if "loss" in row]
    assert sum(losses[-3:]) / 3 < losses[0]
    summary = run.read_json("summary.json")
    assert summary["eval_loss"]["tuned"] < summary["eval_loss"]["base"]


def test_qlora_trains_on_4bit_base(tmp_path, tiny_model_dir, small_sft_file):
    run, output = run_tiny(tmp_path, tiny_model_dir, small_sft_file, adapter={"type": "qlora"},
                           train={"max_steps": 2, "optimizer": "adamw_torch"})
    assert run.status == "completed"
    recipe_text = (run.path / "recipe.yaml").read_text()
    assert "nf4" in recipe_text and "double_quant: true" in recipe_text
    losses = [row["loss"] for row in read_metrics(run.path) if "loss" in row]
    assert all(math.isfinite(v) for v in losses)
    assert (run.path / "adapter" / "adapter_model.safetensors").exists()


def test_qlora_default_optimizer_is_paged_8bit(tiny_model_dir, small_sft_file):
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "qlora"}))
    assert recipe.train.optimizer == "paged_adamw_8bit"
    assert recipe.train.lr == 2e-4


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir, small_sft_file):
    from tuneforge.errors import RunDirError

    run, _ = run_tiny(tmp_path, tiny_model_dir, small_sft_file, train={"max_steps": 1})
    marker = run.path / "adapter" / "adapter_model.safetensors"
    before = marker.read_bytes()
    with pytest.raises(RunDirError, match="already exists"):
        run_tiny(tmp_path, tiny_model_dir, small_sft_file, train={"max_steps": 1})
    assert marker.read_bytes() == before


def test_gradient_accumulation_matches_larger_batch(tmp_path, tiny_model_dir, small_sft_file):
    """One step of batch 4 and one step of 2 x 2 accumulated must give the same weights (token-weighted loss)."""
    import torch
    from safetensors.torch import load_file

    weights = []
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, name=name, adapter={"type": "full"},
                                          train={"max_steps": 1, "batch_size": batch, "grad_accum": accum,
                                                 "lr": 1e-2, "scheduler": "constant"},
                                          eval={"baseline": False}))
        run = train(recipe, output=str(tmp_path / name), console=Console(quiet=True), doctor=False)
        weights.append(load_file(str(run.path / "model" / "model.safetensors")))
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = 0
    for key, value in weights[0].items():
        assert torch.allclose(value, weights[1][key], atol=1e-5), key
        moved += int(not torch.allclose(value, original[key]))
    assert moved > 0


def test_qlora_eval_forward_keeps_weights_trainable(tiny_model_dir):
    """The bitsandbytes CPU repacking bug (library_fixes.py): after an eval forward, training still has autograd."""
    import torch

    from tuneforge.models import load_base_model
    from tuneforge.recipe import ModelSection, QuantSection

    model = load_base_model(ModelSection(name=str(tiny_model_dir)), quant=QuantSection(), device="cpu")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert embeddings.weight.grad is not None and embeddings.weight.grad.abs().sum() > 0


def test_cpt_with_packing_trains(tmp_path, tiny_model_dir):
    from pathlib import Path

    cpt_file = Path(__file__).resolve().parent.parent / "data" / "cpt" / "sample.jsonl"
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, cpt_file, method="cpt", train={"max_steps": 2, "packing": True,
                                                                                     "batch_size": 2}))
    run = train(recipe, output=str(tmp_path / "cpt"), console=Console(quiet=True), doctor=False)
    stats = run.read_json("data_stats.json")
    assert stats["format"] == "text" and stats["loss_tokens"] == stats["train_tokens"]
    losses = [row["loss"] for row in read_metrics(run.path) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("flags, check", [
    ({"use_dora": True}, lambda m: any("lora_magnitude_vector" in n for n, _ in m.named_modules())),
    ({"use_rslora": True}, lambda m: m.peft_config["default"].use_rslora),
    ({"init": "pissa"}, lambda m: m.peft_config["default"].init_lora_weights == "pissa"),
    ({"init": "olora"}, lambda m: m.peft_config["default"].init_lora_weights == "olora"),
    ({"target_modules": ["q_proj", "v_proj"]}, lambda m: set(m.peft_config["default"].target_modules) == {"q_proj", "v_proj"}),
    ({"modules_to_save": ["lm_head"]}, lambda m: any(n.endswith("lm_head.modules_to_save") for n, _ in m.named_modules())),
])
def test_adapter_flags_reach_peft(tiny_model_dir, small_sft_file, flags, check):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import apply_adapter

    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "lora", **flags}))
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe)
    assert check(model)


def test_target_modules_that_match_nothing_are_an_error(tiny_model_dir, small_sft_file):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import apply_adapter
    from tuneforge.errors import RecipeError

    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"target_modules": ["c_attn", "q_proj"]}))
    with pytest.raises(RecipeError) as info:
        apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe)
    assert "c_attn" in str(info.value) and "gate_proj" in str(info.value)


def test_single_string_target_is_a_regex_that_must_match(tiny_model_dir, small_sft_file):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters import apply_adapter
    from tuneforge.errors import RecipeError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(RecipeError, match="regex"):
        apply_adapter(model, parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"target_modules": "q_proj"})))
    wrapped = apply_adapter(model, parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file,
                                                            adapter={"target_modules": r".*\.(q|v)_proj"})))
    assert sum("lora_A" in name for name, _ in wrapped.named_modules()) > 0


def test_tracker_that_is_not_installed_is_a_recipe_error(tmp_path, tiny_model_dir, small_sft_file):
    import importlib.util

    from tuneforge.errors import RecipeError

    missing = next(name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name) is None)
    with pytest.raises(RecipeError, match=f"train.report_to.*{missing} not installed"):
        run_tiny(tmp_path, tiny_model_dir, small_sft_file, train={"max_steps": 1, "report_to": ["tensorboard", missing]})
    assert run_tiny(tmp_path, tiny_model_dir, small_sft_file, train={"max_steps": 1, "report_to": []})[0].status == "completed"
