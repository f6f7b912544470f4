"""The method registry and the one life of a run: methods declare themselves (names, defaults, refusals) and every
method -- RL included -- runs under the same guards; keys a method cannot honour are refused, naming the key, before
a run directory exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import tiny_recipe
from tuneforge.errors import RecipeError
from tuneforge.recipe import parse_recipe
from tuneforge.train import train

ROOT = Path(__file__).resolve().parent.parent


def _quiet(raw: dict) -> dict:
    raw["eval"] = {**raw.get("eval", {}), "baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 2,
                   "max_new_tokens": 4}
    return raw


def _prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = (ROOT / "data" / "verifiable" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _grpo(model_dir, data_file, **train_keys) -> dict:
    return _quiet(tiny_recipe(model_dir, data_file, method="grpo",
                              train={"max_steps": 2, "batch_size": 4, **train_keys},
                              rl={"num_generations": 2, "max_new_tokens": 4, "eval_prompts": 2,
                                  "rewards": [{"name": "length", "options": {"max": 20}}]}))


def test_unknown_method_is_named_with_the_closest_one():
    with pytest.raises(RecipeError, match=r"`method`.*unknown method 'gpro'; did you mean 'grpo'\?"):
        parse_recipe({"name": "x", "method": "gpro", "data": {"train": "t.jsonl"}})


def test_defaults_come_from_the_method_declaration():
    from tuneforge.methods import method_spec

    for method, adapter in (("sft", "lora"), ("dpo", "lora"), ("dpo", "full"), ("grpo", "qlora"), ("ppo", "full")):
        raw = {"name": "x", "method": method, "data": {"train": "t.jsonl"}, "adapter": {"type": adapter},
               "rl": {"reward_model": "r", "rewards": [{"name": "exact_answer"}]}}
        recipe = parse_recipe(raw)
        assert recipe.train.lr == method_spec(method).default_lr(adapter)
        assert recipe.rl.kl_coef == method_spec(method).kl
    assert parse_recipe({"name": "x", "method": "dpo", "data": {"train": "t"}}).train.lr == 5e-6  # LoRA DPO


def test_registry_rejects_a_second_method_of_the_same_name():
    from tuneforge.methods import Method, method_spec, register

    existing = method_spec("sft")
    clone = Method(**{**existing.__dict__, "summary": "another"})
    with pytest.raises(ValueError, match="registered twice"):
        register(clone)


def test_a_section_the_method_does_not_read_is_refused_before_the_run(tmp_path, tiny_model_dir, small_sft_file):
    raw = _quiet(tiny_recipe(tiny_model_dir, small_sft_file, preference={"beta": 0.3}))
    with pytest.raises(RecipeError, match=r"`preference.beta`: method sft does not read the preference: section"):
        train(parse_recipe(raw), output=str(tmp_path / "run"), console=Console(quiet=True), doctor=False)
    assert not (tmp_path / "run").exists()


def test_padding_free_is_refused_for_a_method_whose_trainer_cannot_take_it(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join((ROOT / "data" / "preference" / "train.jsonl").read_text().splitlines()[:12]) + "\n")
    raw = _quiet(tiny_recipe(tiny_model_dir, pairs, method="dpo", speed={"padding_free": True}))
    with pytest.raises(RecipeError, match=r"`speed.padding_free`: method dpo's trainer takes no padding-free"):
        train(parse_recipe(raw), output=str(tmp_path / "run"), console=Console(quiet=True), doctor=False)
    assert not (tmp_path / "run").exists()


def test_rl_keys_the_method_cannot_honour_are_refused():
    base = {"name": "x", "data": {"train": "t.jsonl"}, "train": {"batch_size": 4}}
    cases = [("grpo", {"train": {"batch_size": 4, "eval_every": 5}}, "train.eval_every"),
             ("grpo", {"train": {"batch_size": 4, "early_stopping": {"patience": 2}, "eval_every": 2}},
              "train.eval_every"),
             ("ppo", {"train": {"batch_size": 4, "save_every": 5}}, "train.save_every"),
             ("ppo", {"rl": {"reward_model": "r", "use_vllm": True}}, "rl.use_vllm"),
             ("rloo", {"train": {"batch_size": 4, "packing": True}}, "train.packing")]
    for method, extra, key in cases:
        raw = {**base, "method": method, "rl": {"reward_model": "r", "rewards": [{"name": "exact_answer"}],
                                                "num_generations": 2, **extra.pop("rl", {})}, **extra}
        with pytest.raises(RecipeError, match=f"`{key}`"):
            parse_recipe(raw)


def test_an_rl_run_gets_the_step_guards_and_records_what_ran(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Out of memory inside a GRPO step becomes tuneforge's advice (exit 5, status failed), as for SFT; a completed
    GRPO run's saved recipe says padding-free micro-batches were off (its trainer takes none)."""
    import torch
    from transformers import Trainer

    from tuneforge import cli

    data = _prompts(tmp_path)
    done = train(parse_recipe(_grpo(tiny_model_dir, data)), output=str(tmp_path / "ok"), console=Console(quiet=True),
                 doctor=False)
    saved = yaml.safe_load((done.path / "recipe.yaml").read_text())
    assert saved["speed"]["padding_free"] is False and done.read_json("summary.json")["steps"] == 2

    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(_grpo(tiny_model_dir, data)))
    out = tmp_path / "oom"
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(sys, "argv", ["tuneforge", "train", str(recipe), "--output", str(out), "--no-doctor"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 5, err
    assert "out of memory at step 2 (training" in err and "Traceback" not in err
    assert '"failed"' in (out / "status.json").read_text()


def test_methods_command_lists_every_method(monkeypatch, capsys):
    from tuneforge import cli
    from tuneforge.methods import method_names

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(sys, "argv", ["tuneforge", "methods"])
    try:
        cli.main()
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    assert all(name in out for name in method_names()) and "5e-7" in out


def test_the_run_resolves_a_copy_of_the_recipe(tmp_path, tiny_model_dir, small_sft_file):
    """Resolved settings are new values: the caller's recipe keeps its `auto`s and relative paths; the saved
    recipe.yaml holds the decisions."""
    raw = _quiet(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 1}))
    recipe = parse_recipe(raw)
    before = recipe.model_dump()
    run = train(recipe, output=str(tmp_path / "run"), console=Console(quiet=True), doctor=False)
    assert recipe.model_dump() == before and recipe.speed.padding_free == "auto"
    saved = yaml.safe_load((run.path / "recipe.yaml").read_text())
    assert saved["speed"]["padding_free"] in (True, False) and saved["train"]["gradient_checkpointing"] in (True, False)


def test_kto_on_unpaired_data_trains_and_scores(tmp_path, tiny_model_dir):
    """TRL's unpaired KTO layout (prompt, completion, label) has no pairs to measure preference accuracy on: the
    run says so and completes (it used to stop with KeyError 'reference_free' after the model loaded)."""
    import json

    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"Answer: {2 * i}.", "label": True} for i in range(12)]
    rows += [{"prompt": f"What is {i} + {i}?", "completion": f"Answer: {2 * i + 1}.", "label": False} for i in range(12)]
    data = tmp_path / "kto.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = _quiet(tiny_recipe(tiny_model_dir, data, method="kto", train={"max_steps": 2, "batch_size": 4}))
    console = Console(record=True, width=200)
    run = train(parse_recipe(raw), output=str(tmp_path / "kto"), console=console, doctor=False)
    assert run.status == "completed" and (run.path / "adapter").is_dir()
    assert "no held-out pairs (unpaired data), not measured" in console.export_text()
    assert run.read_json("summary.json")["preference"] is None
