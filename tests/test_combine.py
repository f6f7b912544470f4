"""tuneforge combine: LoRA runs through PEFT's add_weighted_adapter, full runs through mergekit, the result scored on
every source's held-out set; bad input refused with exit 2. Tiny random Llamas, a few training steps each."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from rich.console import Console

from conftest import QUICKSTART, run_cli, tiny_recipe
from tuneforge.recipe import parse_recipe


def _train(tmp_path_factory, model_dir, data_file, name, **sections):
    from tuneforge.train import train

    recipe = parse_recipe(tiny_recipe(model_dir, data_file, name=name, **sections))
    return train(recipe, output=str(tmp_path_factory.mktemp(name) / "run"), console=Console(quiet=True), doctor=False)


@pytest.fixture(scope="module")
def other_sft_file(tmp_path_factory):
    """A second task's data: 32 different quickstart examples."""
    lines = (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[100:132]
    path = tmp_path_factory.mktemp("data2") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


EVAL = {"forgetting": False, "few_shot": 0, "max_examples": 3, "max_new_tokens": 6, "baseline": False}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir, small_sft_file, other_sft_file):
    return [_train(tmp_path_factory, tiny_model_dir, data, f"task{i}", train={"max_steps": 3, "lr": 1e-2, "seed": i},
                   eval=EVAL)
            for i, data in enumerate((small_sft_file, other_sft_file))]


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_model_dir, small_sft_file, other_sft_file):
    return [_train(tmp_path_factory, tiny_model_dir, data, f"full{i}", adapter={"type": "full"},
                   train={"max_steps": 2, "lr": 1e-3, "seed": i}, eval=EVAL)
            for i, data in enumerate((small_sft_file, other_sft_file))]


def _delta(adapter_dir, base_weight, module="model.layers.0.self_attn.q_proj"):
    """W_merged - W_base for one module, from an adapter folder (PEFT's own merge)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.get_submodule(module).weight.detach() - base_weight


def test_linear_lora_combine_is_the_weighted_sum_of_updates_and_is_scored(tmp_path, lora_runs, tiny_model_dir,
                                                                          monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "combined"
    code, text = run_cli(monkeypatch, capsys, "combine", *(str(r.path) for r in lora_runs), "--method", "linear",
                         "--weights", "0.7,0.3", "--output", str(out), with_stdout=True)
    assert code == 0, text
    assert "held-out" in text and "combined" in text and "task0" in text and "task1" in text
    base_weight = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].self_attn.q_proj.weight.detach()
    deltas = [_delta(r.path / "adapter", base_weight) for r in lora_runs]
    combined = _delta(out / "adapter", base_weight)
    assert deltas[0].abs().max() > 1e-4 and not torch.allclose(deltas[0], deltas[1])
    assert torch.allclose(combined, 0.7 * deltas[0] + 0.3 * deltas[1], atol=1e-6)

    report = json.loads((out / "combine.json").read_text())
    assert report["peft_combination_type"] == "cat" and report["weights"] == [0.7, 0.3]
    assert [row["held_out"] for row in report["scores"]] == ["task0", "task1"]
    for row, run in zip(report["scores"], lora_runs):
        assert set(row["scores"]) == {"task0", "task1", "combined"}
        assert row["n"] == len(json.loads((run.path / "eval" / "tuned.json").read_text())["samples"])
        assert all(0 <= v <= 100 for scores in row["scores"].values() for v in scores.values())
    # the output is laid out like a run: what eval / generate / chat load it with takes it, adapter on the base
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.models import load_target

    model, tokenizer = load_target(str(out), device="cpu")
    assert type(model).__name__.startswith("Peft") and model.peft_config["default"].r == 2 * 16
    assert isinstance(generate_answers(model, tokenizer, ["hi"], max_new_tokens=3)[0], str)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_ties_and_dare_on_adapters(tmp_path, lora_runs, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.combine import combine

    result = combine([str(r.path) for r in lora_runs], method=method, weights=[1.0, 1.0], density=0.5,
                     output=str(tmp_path / method))
    assert result["peft_combination_type"] == f"{method}_svd" and result["density"] == 0.5
    config = json.loads((tmp_path / method / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * json.loads((lora_runs[0].path / "adapter" / "adapter_config.json").read_text())["r"]
    base_weight = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].self_attn.q_proj.weight.detach()
    deltas = [_delta(r.path / "adapter", base_weight) for r in lora_runs]
    combined = _delta(tmp_path / method / "adapter", base_weight)
    # pruned and re-weighted, so neither the plain sum nor zero
    assert combined.abs().max() > 1e-5 and not torch.allclose(combined, deltas[0] + deltas[1], atol=1e-5)


def test_slerp_on_adapters_goes_through_merged_models(tmp_path, lora_runs):
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.combine import combine
    from tuneforge.ops.merge import merge_run

    out = tmp_path / "slerp"
    result = combine([str(r.path) for r in lora_runs], method="slerp", weights=[0.5, 0.5], density=None,
                     output=str(out))
    assert result["mergekit_method"] == "slerp" and (out / "model" / "config.json").is_file()
    assert not (out / "adapter").exists() and not list(out.glob(".source*"))
    merged = [AutoModelForCausalLM.from_pretrained(merge_run(str(r.path), str(tmp_path / f"m{i}")))
              for i, r in enumerate(lora_runs)]
    combined = AutoModelForCausalLM.from_pretrained(out / "model")
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b, c = (m.state_dict()[name] for m in (*merged, combined))
    assert not torch.allclose(a, b)
    # between the two: closer to their midpoint than either end is
    assert (c - (a + b) / 2).norm() < (a - (a + b) / 2).norm()


def test_full_models_combine_through_mergekit(tmp_path, full_runs, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full-linear"
    code, text = run_cli(monkeypatch, capsys, "combine", *(str(r.path) for r in full_runs), "--method", "linear",
                         "--weights", "1,3", "--output", str(out), with_stdout=True)
    assert code == 0, text
    states = [AutoModelForCausalLM.from_pretrained(r.path / "model").state_dict() for r in full_runs]
    combined = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.allclose(states[0][name], states[1][name])
    assert torch.allclose(combined[name], 0.25 * states[0][name] + 0.75 * states[1][name], atol=1e-6)  # normalized
    report = json.loads((out / "combine.json").read_text())
    assert report["mergekit_method"] == "linear" and len(report["scores"]) == 2
    assert (out / "model" / "chat_template.jinja").is_file()

    result = __import__("tuneforge.deploy.combine", fromlist=["combine"]).combine(
        [str(r.path) for r in full_runs], method="ties", weights=[0.5, 0.5], density=0.5, output=str(tmp_path / "t"))
    assert result["density"] == 0.5 and (tmp_path / "t" / "model" / "model.safetensors").is_file()


def _refused(monkeypatch, capsys, *args, says: list[str]) -> None:
    code, text = run_cli(monkeypatch, capsys, "combine", *args, with_stdout=True)
    assert code == 2, text
    assert "Traceback" not in text
    for part in says:
        assert part in text, (part, text)


def test_combine_bad_input(tmp_path, lora_runs, full_runs, tiny_model_dir, monkeypatch, capsys):
    a, b = (str(r.path) for r in lora_runs)
    out = str(tmp_path / "out")
    _refused(monkeypatch, capsys, a, b, "--method", "average", "--output", out, says=["unknown combine method"])
    _refused(monkeypatch, capsys, a, "--output", out, says=["at least two runs"])
    _refused(monkeypatch, capsys, a, b, "--weights", "0.5", "--output", out, says=["1 value(s) for 2 sources"])
    _refused(monkeypatch, capsys, a, b, "--weights", "half,half", "--output", out, says=["expected numbers"])
    _refused(monkeypatch, capsys, a, b, "--weights", "0,0", "--output", out, says=["--weights", "not all of them zero"])
    _refused(monkeypatch, capsys, a, b, "--weights", "nan,1", "--output", out, says=["finite number"])
    _refused(monkeypatch, capsys, a, b, "--max-examples", "0", "--output", out, says=["--max-examples", "at least 1"])
    _refused(monkeypatch, capsys, a, b, a, "--method", "slerp", "--output", out, says=["exactly two models"])
    _refused(monkeypatch, capsys, a, b, "--density", "0.3", "--output", out, says=["ties and dare only"])
    _refused(monkeypatch, capsys, a, str(full_runs[0].path), "--output", out, says=["some runs trained adapters"])
    other_base = tmp_path / "other-base"  # a run whose recipe names another base model
    shutil.copytree(tiny_model_dir, other_base)
    other = tmp_path / "other-run"
    shutil.copytree(b, other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["model"] = {**recipe["model"], "name": str(other_base)} if isinstance(recipe["model"], dict) \
        else str(other_base)
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _refused(monkeypatch, capsys, a, str(other), "--output", out, says=["different base models", str(other_base)])
    failed = tmp_path / "failed"
    shutil.copytree(b, failed)
    (failed / "status.json").write_text(json.dumps({"state": "failed"}))
    _refused(monkeypatch, capsys, a, str(failed), "--output", out, says=["did not complete"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("x")
    _refused(monkeypatch, capsys, a, b, "--output", str(taken), says=["already exists"])
    _refused(monkeypatch, capsys, a, b, "--output", str(taken), "--overwrite", says=["not an earlier combine output"])
    assert (taken / "mine.txt").read_text() == "x" and not (tmp_path / "out").exists()

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "mergekit" else real_find_spec(name, *rest))
    full = [str(r.path) for r in full_runs]
    _refused(monkeypatch, capsys, *full, "--output", out, says=["--method", "needs mergekit", "pip install"])
    _refused(monkeypatch, capsys, a, b, "--method", "slerp", "--output", out, says=["needs mergekit"])
    assert not (tmp_path / "out").exists()
