"""Preference methods (dpo with its loss variants, kto, orpo, simpo, cpo) on a tiny random model: finite losses, the
margin moves the right way, the PEFT reference keeps no second model, bad pairs fail with file:line, stages chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from conftest import read_metrics, tiny_recipe
from tuneforge.errors import DataError
from tuneforge.recipe import parse_recipe
from tuneforge.train import train

ROOT = Path(__file__).resolve().parent.parent
PREFS = ROOT / "data" / "preference" / "train.jsonl"


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    lines = PREFS.read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pref_recipe(model_dir, data_file, method="dpo", **sections):
    base = tiny_recipe(model_dir, data_file, method=method,
                       train={"max_steps": 4, "batch_size": 4, "grad_accum": 1, "max_length": 128, "seed": 0,
                              "warmup": 0, "lr": 5e-3, "scheduler": "constant"},
                       eval={"max_examples": 4, "max_new_tokens": 4, "batch_size": 4, "forgetting": False,
                             "baseline": False})
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def run_pref(tmp_path, model_dir, data_file, method="dpo", name="run", **sections):
    recipe = parse_recipe(pref_recipe(model_dir, data_file, method, **sections))
    return train(recipe, output=str(tmp_path / name), console=Console(record=True, width=200), doctor=False)


@pytest.mark.parametrize("method,loss", [("dpo", "sigmoid"), ("dpo", "ipo"), ("dpo", "hinge"), ("dpo", "robust"),
                                         ("kto", "kto"), ("orpo", None), ("simpo", None), ("cpo", None)])
def test_loss_variants_train_and_move_margin(tmp_path, tiny_model_dir, pref_file, method, loss):
    preference = {"loss_type": loss} if loss else {}
    if loss == "robust":
        preference["label_smoothing"] = 0.1
    run = run_pref(tmp_path, tiny_model_dir, pref_file, method, preference=preference)
    assert run.status == "completed"
    rows = read_metrics(run.path)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    result = run.read_json("eval/preference.json")
    assert result["before"]["implicit_reward"] == 50.0
    if method in ("orpo", "simpo", "cpo"):  # reference-free, length-normalised objectives: the per-token margin grows
        assert result["after"]["mean_logp_margin"] > result["before"]["mean_logp_margin"], result
    else:  # the policy moved chosen up relative to rejected (against the start model) on held-out pairs
        assert result["after"]["implicit_reward_margin"] > 0, result
    summary = run.read_json("summary.json")
    assert summary["preference"]["after"]["n"] > 0


@pytest.mark.parametrize("adapter,ref", [("full", "copy"), ("lora", "precomputed"), ("full", "precomputed")])
def test_reference_copy_and_precomputed_train(tmp_path, tiny_model_dir, pref_file, adapter, ref):
    """preference.ref copy (a frozen second model) and precomputed (log-probs once, no reference in memory)."""
    run = run_pref(tmp_path, tiny_model_dir, pref_file, adapter={"type": adapter}, preference={"ref": ref},
                   train={"lr": 5e-4 if adapter == "full" else 5e-3})
    assert run.status == "completed"
    result = run.read_json("eval/preference.json")
    assert result["after"]["implicit_reward_margin"] > 0, result
    losses = [r["loss"] for r in read_metrics(run.path) if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


def test_sft_weight_keeps_chosen_answers_likely(tmp_path, tiny_model_dir, pref_file):
    """preference.sft_weight adds TRL's sft loss to DPO's: the chosen answers end more likely than under plain DPO."""
    plain = run_pref(tmp_path, tiny_model_dir, pref_file, name="plain").read_json("eval/preference.json")["after"]
    run = run_pref(tmp_path, tiny_model_dir, pref_file, name="rpo", preference={"sft_weight": 1.0})
    assert run.status == "completed"
    with_sft = run.read_json("eval/preference.json")["after"]
    assert with_sft["chosen_logp"] > plain["chosen_logp"], (with_sft, plain)
    assert with_sft["implicit_reward_margin"] > 0, with_sft
    from tuneforge.errors import RecipeError
    with pytest.raises(RecipeError, match="sft_weight"):
        run_pref(tmp_path, tiny_model_dir, pref_file, method="orpo", name="bad", preference={"sft_weight": 1.0})


def test_peft_reference_keeps_no_second_model(tmp_path, tiny_model_dir, pref_file):
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.methods import get_method
    from tuneforge.models import load_base_model, load_tokenizer
    from tuneforge.adapters import apply_adapter
    from tuneforge.methods.preference import preference_datasets
    from tuneforge.methods import method_spec
    from tuneforge.run import RunContext, RunDir

    recipe = parse_recipe(pref_recipe(tiny_model_dir, pref_file))
    tokenizer = load_tokenizer(recipe.model.name)
    data = prepare_data(recipe, tokenizer)
    model = apply_adapter(load_base_model(recipe.model, device="cpu"), recipe)
    base_tensors = sum(1 for n, _ in model.named_parameters() if "lora_" not in n)
    modules = sum(1 for _ in model.modules())
    train_ds, eval_ds = preference_datasets(recipe, data)
    ctx = RunContext(recipe=recipe, spec=method_spec("dpo"), tokenizer=tokenizer, data=data, device="cpu",
                     console=None, run=RunDir(tmp_path / "r"))
    trainer = get_method("dpo")(ctx, model, train_ds, eval_ds, [])
    assert trainer.ref_model is None
    assert sum(1 for n, _ in trainer.model.named_parameters() if "lora_" not in n) == base_tensors
    assert sum(1 for _ in trainer.model.modules()) == modules  # no copy of the network anywhere


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Q?", "chosen": "same answer", "rejected": "Same  answer"}, "the same answer"),
    ({"prompt": "Q?", "chosen": "", "rejected": "no"}, "`chosen` is empty"),
    ({"prompt": "Q?", "chosen": "yes", "rejected": None}, "`rejected` is empty"),
])
def test_bad_pairs_name_file_and_line(tmp_path, tiny_model_dir, pref_file, row, message):
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.models import load_tokenizer

    path = tmp_path / "bad.jsonl"
    good = pref_file.read_text().splitlines()[:3]
    path.write_text("\n".join(good + [json.dumps(row)]) + "\n")
    recipe = parse_recipe(pref_recipe(tiny_model_dir, path))
    with pytest.raises(DataError, match=message) as info:
        prepare_data(recipe, load_tokenizer(str(tiny_model_dir)))
    assert f"{path}:4" in str(info.value)


def test_conversation_formats(tmp_path, tiny_model_dir):
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.models import load_tokenizer

    user = {"role": "user", "content": "Capital of France?"}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Answer: Paris."}],
         "rejected": [{"role": "assistant", "content": "Well, it is Paris!"}]},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Answer: 4."}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is four."}]},
    ] * 1
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe(pref_recipe(tiny_model_dir, path, data={"train": str(path), "eval": str(path)}))
    data = prepare_data(recipe, load_tokenizer(str(tiny_model_dir)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for pair in data.eval_pairs:
        assert tokenizer.decode(pair.chosen_ids).startswith("Answer:")
        assert tokenizer.decode(pair.prompt_ids).rstrip().endswith("assistant")


def test_stages_sft_then_dpo(tmp_path, tiny_model_dir, pref_file, small_sft_file):
    raw = pref_recipe(tiny_model_dir, small_sft_file, method="sft")
    raw["train"]["max_steps"] = 2
    raw["stages"] = [{"name": "sft", "method": "sft"},
                     {"name": "dpo", "method": "dpo", "data": {"train": str(pref_file)}, "train": {"max_steps": 2}}]
    recipe = parse_recipe(raw)
    last = train(recipe, output=str(tmp_path / "multi"), console=Console(record=True, width=200), doctor=False)
    parent = tmp_path / "multi"
    assert (parent / "sft" / "adapter" / "adapter_config.json").exists()
    assert last.path == parent / "dpo" and last.status == "completed"
    stages = json.loads((parent / "stages.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["completed", "completed"]
    dpo_recipe = (parent / "dpo" / "recipe.yaml").read_text()
    assert str((parent / "sft").resolve()) in dpo_recipe  # model.adapter: the SFT stage
    assert "ref" not in json.loads((parent / "dpo" / "adapter" / "adapter_config.json").read_text()).get("_", [])
    assert not (parent / "dpo" / "adapter" / "ref").exists()


def test_merge_mode_trains_fresh_adapter(tmp_path, tiny_model_dir, pref_file, small_sft_file):
    sft = train(parse_recipe(pref_recipe(tiny_model_dir, small_sft_file, method="sft", train={"max_steps": 1})),
                output=str(tmp_path / "sft"), console=Console(record=True, width=200), doctor=False)
    run = run_pref(tmp_path, tiny_model_dir, pref_file, "dpo", name="dpo",
                   model={"name": str(tiny_model_dir), "adapter": str(sft.path), "adapter_mode": "merge"},
                   train={"max_steps": 2})
    assert run.status == "completed" and (run.path / "adapter" / "adapter_model.safetensors").exists()


def test_recipe_defaults_and_refusals(tiny_model_dir, pref_file):
    from tuneforge.errors import RecipeError

    full = parse_recipe({"name": "x", "method": "dpo", "data": {"train": "p.jsonl"}, "adapter": {"type": "full"}})
    lora = parse_recipe({"name": "x", "method": "dpo", "data": {"train": "p.jsonl"}})
    assert full.train.lr == 5e-7 and lora.train.lr == 5e-6 and lora.preference.beta == 0.1
    with pytest.raises(RecipeError, match="adapter_mode"):
        parse_recipe({"name": "x", "method": "dpo", "data": {"train": "p.jsonl"}, "adapter": {"type": "full"},
                      "model": {"adapter": "runs/sft"}})
    with pytest.raises(RecipeError, match="stages.1"):
        parse_recipe({"name": "x", "data": {"train": "p.jsonl"}, "stages": [{"name": "a"}, {"name": "b", "method": "x"}]})
