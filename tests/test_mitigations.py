"""Forgetting mitigations (issue #24): data mixing by share, the shipped replay set, KL to the base model, EWC, and
the probe during training."""

from __future__ import annotations

import json

import pytest

from conftest import read_metrics, tiny_recipe
from tuneforge.data.mixing import mix, quotas
from tuneforge.errors import RecipeError
from tuneforge.recipe import GENERAL_REPLAY, parse_recipe, resolve_path

QUICK_EVAL = {"max_examples": 2, "max_new_tokens": 4, "batch_size": 2, "few_shot": 0, "forgetting": False}


def test_quotas_keep_the_total_and_give_each_source_its_share():
    assert quotas([80, 20], [0.85, 0.15]) == [85, 15]  # 100 examples, 85/15: the replay source is repeated
    assert quotas([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert sum(quotas([7, 5], [0.3, 0.7])) == 12


def test_mix_samples_or_repeats_each_source_and_counts_it():
    task = [{"messages": [], "i": i} for i in range(80)]
    general = [{"messages": [], "g": i} for i in range(5)]
    mixed, counts = mix([("task.jsonl", 0.85, task), ("general.jsonl", 0.15, general)], seed=0)
    assert len(mixed) == 85
    assert sum(e["source"] == "general.jsonl" for e in mixed) == 13  # 15% of 85 (rounded), 5 available: repeated
    assert counts[1] == {"path": "general.jsonl", "weight": 0.15, "share": 0.15, "available": 5, "used": 13,
                         "repeated": 8}
    assert counts[0]["used"] == 72 and counts[0]["repeated"] == 0 and len({e["i"] for e in mixed if "i" in e}) == 72
    assert mix([("a", 1, task), ("b", 1, general)], seed=0) == mix([("a", 1, task), ("b", 1, general)], seed=0)


def test_a_recipe_mixes_task_and_replay_data_with_counts_in_data_stats(tmp_path, smol_tokenizer, tiny_model_dir,
                                                                      small_sft_file):
    from tuneforge.data.pipeline import prepare_data

    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, data={
        "train": [{"path": str(small_sft_file), "weight": 0.8}, {"path": GENERAL_REPLAY, "weight": 0.2}],
        "eval_fraction": 0.2}))
    data = prepare_data(recipe, smol_tokenizer)
    train, held_out = data.stats.sources["train"], data.stats.sources["eval"]
    assert [s["share"] for s in train] == [0.8, 0.2]
    total = sum(s["used"] for s in train)
    assert total == sum(s["available"] for s in train)
    assert abs(train[1]["used"] - 0.2 * total) <= 1
    assert sum(e.get("source") == GENERAL_REPLAY for e in data.train_examples) == train[1]["used"]
    assert {s["path"] for s in held_out} == {str(small_sft_file), GENERAL_REPLAY}


def test_replay_set_is_shipped_correct_and_disjoint_from_the_probe():
    from tuneforge.evaluate.forgetting import load_instruction_items, load_probe_items

    rows = [json.loads(line) for line in open(resolve_path(parse_recipe({"name": "x", "data": {"train": "t.jsonl"}}),
                                                            GENERAL_REPLAY), encoding="utf-8")]
    assert len(rows) >= 250
    questions = {r["messages"][0]["content"].strip().lower() for r in rows}
    assert len(questions) == len(rows)
    probe = {str(item.get("question", "")).strip().lower() for item in load_probe_items()}
    probe |= {str(item.get("prompt", item.get("instruction", ""))).strip().lower() for item in load_instruction_items()}
    assert not questions & probe
    sums = [r for r in rows if "apples in total" in r["messages"][1]["content"]]
    for r in sums:  # the answers are computed, not written by hand: spot-check the arithmetic
        words = r["messages"][0]["content"].split()
        a, b = int(words[3]), int(words[9])
        assert r["messages"][1]["content"] == f"It sold {a} + {b} = {a + b} apples in total."


@pytest.mark.parametrize("sections, key", [
    ({"method": "dpo", "train": {"kl_to_base": 0.1}}, "train.kl_to_base"),
    ({"method": "dpo", "train": {"ewc": {"lambda": 10}}}, "train.ewc"),
    ({"method": "dpo", "data": {"train": [{"path": "a.jsonl", "weight": 1}]}}, "data.train"),
    ({"data": {"train": []}}, "data.train"),
])
def test_mitigations_are_refused_where_they_are_not_read(tiny_model_dir, small_sft_file, sections, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, **sections))


def test_token_kl_is_zero_for_equal_logits_and_matches_a_hand_computation():
    import math

    import torch

    from tuneforge.mitigations import token_kl

    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])  # position 1 predicts [0.75, 0.25]
    ref = torch.zeros(1, 3, 2)  # [0.5, 0.5]
    labels = torch.tensor([[-100, -100, 1]])  # only the prediction made at position 1 carries loss
    assert float(token_kl(ref, ref, labels)) == 0.0
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(token_kl(logits, ref, labels)) == pytest.approx(expected)


def _train(tmp_path, tiny_model_dir, small_sft_file, **sections):
    from rich.console import Console

    from tuneforge.train import train

    sections.setdefault("eval", QUICK_EVAL)
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, **sections))
    return train(recipe, output=str(tmp_path / "run"), console=Console(record=True, width=200), doctor=False)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_kl_to_base_is_zero_at_the_first_step_and_grows_with_drift(tmp_path, tiny_model_dir, small_sft_file, adapter):
    """LoRA: the adapter-off model is the reference; full fine-tuning: a frozen copy of the starting weights."""
    lr = 5e-2 if adapter == "lora" else 1e-3
    run = _train(tmp_path, tiny_model_dir, small_sft_file, adapter={"type": adapter},
                 train={"max_steps": 6, "lr": lr, "kl_to_base": 0.5, "scheduler": "constant", "logging_steps": 1})
    assert run.status == "completed"
    kl = [r["kl_to_base"] for r in read_metrics(run.path) if "kl_to_base" in r]
    assert len(kl) == 6
    if adapter == "lora":
        assert kl[0] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base model (B = 0): no divergence yet
    else:  # measured 1.6e-4 at step 1, 1.3e-2 at step 6 (before the frozen copy was taken first it stayed 0.0)
        assert 0 < kl[0] < 0.05 * kl[-1]
    assert kl[-1] > 1e-4 and kl[-1] > kl[1]


def test_ewc_penalty_by_hand_and_in_a_run(tmp_path, tiny_model_dir, small_sft_file):
    import torch

    from tuneforge.mitigations import EWC

    model = torch.nn.Linear(2, 1, bias=False)

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def forward(**batch):
        return Out(((model(batch["x"]) - batch["y"]) ** 2).sum())

    wrapped = type("M", (), {"named_parameters": model.named_parameters, "zero_grad": model.zero_grad,
                             "eval": model.eval, "train": model.train, "training": True, "__call__": lambda s, **b: forward(**b)})()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0]]))
    batches = [{"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([[0.0]])},
               {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([[1.0]])}]
    ewc = EWC(wrapped, batches, strength=2.0)
    # grads: batch 1: 2*(1-0)*[1,0] = [2,0]; batch 2: 2*(0-1)*[0,1] = [0,-2]; Fisher = mean of squares = [2, 2]
    assert ewc.fisher["weight"].tolist() == [[2.0, 2.0]]
    assert float(ewc.penalty()) == 0.0
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.5, -1.0]]))
    assert float(ewc.penalty()) == pytest.approx(0.5 * 2.0 * (2 * 0.25 + 2 * 1.0))

    run = _train(tmp_path, tiny_model_dir, small_sft_file,
                 train={"max_steps": 3, "lr": 5e-2, "ewc": {"lambda": 100.0, "fisher_examples": 4}, "logging_steps": 1})
    penalties = [r["ewc_penalty"] for r in read_metrics(run.path) if "ewc_penalty" in r]
    assert penalties[0] == pytest.approx(0.0, abs=1e-9) and penalties[-1] > 0
    assert "lambda: 100.0" in (run.path / "recipe.yaml").read_text()  # saved under the key the user wrote


def test_probe_runs_during_training(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    from tuneforge.evaluate import forgetting

    few = forgetting.load_probe_items()[:6]
    monkeypatch.setattr(forgetting, "load_probe_items", lambda **kwargs: few)  # six items keep the tiny run quick
    run = _train(tmp_path, tiny_model_dir, small_sft_file, train={"max_steps": 4},
                 eval={**QUICK_EVAL, "forgetting_every": 2})
    rows = [r for r in read_metrics(run.path) if "probe_accuracy" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0.0 <= r["probe_accuracy"] <= 100.0 for r in rows)


def test_kl_to_base_changes_the_training_not_only_its_log(tmp_path, tiny_model_dir, small_sft_file):
    """The KL term must carry a gradient: the same seed and data with and without it end in different weights
    (TRL's fused-head SFTTrainer returns logits without gradient; a KL on those was logged but trained nothing)."""
    import torch
    from safetensors.torch import load_file

    weights = []
    for coef in (0.0, 5.0):
        run = _train(tmp_path / f"kl{coef}", tiny_model_dir, small_sft_file, adapter={"type": "full"},
                     train={"max_steps": 2, "lr": 1e-3, "kl_to_base": coef, "scheduler": "constant"})
        weights.append(load_file(str(run.path / "model" / "model.safetensors")))
    changed = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert changed, "kl_to_base left every weight as plain SFT trained it"
