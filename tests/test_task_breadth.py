"""Task breadth (issue #25, first items): hub splits by name, curricula (data.order), early stopping keeps the best."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe
from tuneforge.errors import DataError, RecipeError
from tuneforge.recipe import parse_recipe


def test_hub_eval_split_is_the_one_named(monkeypatch, smol_tokenizer, tiny_model_dir):
    import datasets

    from tuneforge.data.pipeline import prepare_data

    asked = []

    def fake_load_dataset(name, split):
        asked.append((name, split))
        rows = [{"messages": [{"role": "user", "content": f"q{i} {split}"}, {"role": "assistant", "content": f"a{i}"}]}
                for i in range(6)]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, "HuggingFaceH4/ultrachat_200k", data={
        "train": "HuggingFaceH4/ultrachat_200k", "eval": "HuggingFaceH4/ultrachat_200k", "split": "train_sft",
        "eval_split": "test_sft"}))
    data = prepare_data(recipe, smol_tokenizer)
    assert asked == [("HuggingFaceH4/ultrachat_200k", "train_sft"), ("HuggingFaceH4/ultrachat_200k", "test_sft")]
    assert "test_sft" in data.eval_examples[0]["messages"][0]["content"]


def _rows(tmp_path, difficulties):
    path = tmp_path / "curriculum.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "x" * (10 - d) + f" level {d}"},
                                                     {"role": "assistant", "content": f"answer {d}"}],
                                        "difficulty": d}) + "\n" for d in difficulties), encoding="utf-8")
    return path


def test_curriculum_by_a_field_and_by_length(tmp_path, smol_tokenizer, tiny_model_dir):
    from tuneforge.data.pipeline import prepare_data

    path = _rows(tmp_path, [5, 1, 4, 2, 3, 9, 7, 8, 6, 0])
    base = dict(eval=str(path))  # a separate eval file: every record trains
    by_field = prepare_data(parse_recipe(tiny_recipe(tiny_model_dir, path, data={"train": str(path), **base,
                                                                                "order": "difficulty"})), smol_tokenizer)
    assert [e["order"] for e in by_field.train_examples] == list(range(10))
    by_length = prepare_data(parse_recipe(tiny_recipe(tiny_model_dir, path, data={"train": str(path), **base,
                                                                                 "order": "length"})), smol_tokenizer)
    lengths = [len(t.input_ids) for t in by_length.train]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_curriculum_trains_in_order_and_doctor_warns(tmp_path, tiny_model_dir):
    from tuneforge.guide.doctor import run_doctor
    from tuneforge.methods.common import common_arguments

    path = _rows(tmp_path, [3, 1, 2])
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, path, data={"train": str(path), "order": "difficulty"}))

    class Run:
        def file(self, name):
            return tmp_path / name

    assert common_arguments(recipe, Run(), "cpu")["train_sampling_strategy"] == "sequential"
    shuffled = parse_recipe(tiny_recipe(tiny_model_dir, path))
    assert "train_sampling_strategy" not in common_arguments(shuffled, Run(), "cpu")  # the Trainer's random default
    findings = [f for f in run_doctor(recipe) if f.code == "curriculum-order"]
    assert findings and "hurts general fine-tuning" in findings[0].why
    assert not [f for f in run_doctor(shuffled) if f.code == "curriculum-order"]


def test_curriculum_refusals(tmp_path, smol_tokenizer, tiny_model_dir):
    from tuneforge.data.pipeline import prepare_data

    path = _rows(tmp_path, [1, 2])
    with pytest.raises(RecipeError, match="data.order.*packing"):
        parse_recipe(tiny_recipe(tiny_model_dir, path, data={"train": str(path), "order": "length"},
                                 train={"packing": True}))
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, path, data={"train": str(path), "order": "level"}))
    with pytest.raises(DataError, match="sorts by the field 'level'") as info:
        prepare_data(recipe, smol_tokenizer)
    assert f"{path}:1" in info.value.render()


def test_new_tokens_grow_the_embeddings_train_with_lora_and_reload(tmp_path, tiny_model_dir, small_sft_file):
    """model.add_tokens: the tokenizer and the embedding rows grow (new rows = mean of the old), LoRA trains the
    embedding in full (modules_to_save filled in), and generate/merge reload the run with the new vocabulary."""
    import torch
    from rich.console import Console

    from tuneforge.models import load_target
    from tuneforge.ops.merge import merge_run
    from tuneforge.train import train

    data = tmp_path / "tagged.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"tag {i}"},
                                                     {"role": "assistant", "content": f"<tag_{i % 2}> done"}]}) + "\n"
                            for i in range(16)), encoding="utf-8")
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, data, model={"name": str(tiny_model_dir),
                                                                   "add_special_tokens": ["<tag_0>", "<tag_1>"]},
                                      train={"max_steps": 2, "lr": 1e-2},
                                      eval={"max_examples": 2, "max_new_tokens": 4, "few_shot": 0, "forgetting": False}))
    assert recipe.adapter.modules_to_save == ["embed_tokens", "lm_head"]
    console = Console(record=True, width=200)
    run = train(recipe, output=str(tmp_path / "run"), console=console, doctor=True)
    assert run.status == "completed" and "grew by 2 rows" in console.export_text()
    model, tokenizer = load_target(str(run.path), device="cpu")
    new_id = tokenizer.convert_tokens_to_ids("<tag_1>")
    assert len(tokenizer.tokenize("<tag_1>")) == 1 and new_id >= 49152
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    assert not torch.allclose(embeddings[new_id], base.mean(dim=0), atol=1e-6)  # trained away from the mean start
    merged = merge_run(str(run.path), str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert torch.allclose(reloaded.get_input_embeddings().weight[new_id], embeddings[new_id], atol=1e-5)


def test_mean_initialisation_of_new_rows(tiny_model_dir, smol_tokenizer):
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.vocab import match_vocabulary

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.add_tokens(["<brand_new>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    assert match_vocabulary(model, tokenizer) == 1 and match_vocabulary(model, tokenizer) == 0
    grown = model.get_input_embeddings().weight
    assert torch.allclose(grown[-1], old.mean(dim=0)) and torch.equal(grown[: len(old)], old)


def test_sparse_kl_by_hand():
    import math

    import torch

    from tuneforge.methods.distill import sparse_kl

    # one row, tokens [5, 6, 7]; the answer is token 7, predicted at position 1; vocabulary of 3 at temperature 1
    ids, mask, labels = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[-100, -100, 7]])
    logits = torch.zeros(1, 3, 3)  # the student: uniform, so [0.5, 0.5] over the teacher's two ids
    teacher = {(5, 6, 7): (torch.tensor([[0, 1]], dtype=torch.int32),
                           torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float16))}
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(sparse_kl(logits, ids, mask, labels, teacher, 1.0)) == pytest.approx(expected, rel=1e-3)
    assert float(sparse_kl(logits, ids, mask, labels, {}, 1.0)) == 0.0  # an unscored row adds nothing


def test_distill_trains_from_a_teacher_scored_once(tmp_path, tiny_model_dir, small_sft_file):
    from rich.console import Console

    from conftest import read_metrics
    from tuneforge.train import train

    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, method="distill",
                                      distill={"teacher": str(tiny_model_dir), "top_k": 5},
                                      train={"max_steps": 2},
                                      eval={"max_examples": 2, "max_new_tokens": 4, "few_shot": 0, "forgetting": False}))
    run = train(recipe, output=str(tmp_path / "run"), console=Console(record=True, width=200), doctor=False)
    assert run.status == "completed"
    summary = run.read_json("summary.json")["distill"]
    assert summary["top_k"] == 5 and summary["positions"] > 0 and summary["stored_bytes"] == summary["positions"] * 5 * 6
    assert summary["teacher_metrics"] is not None
    rows = [r for r in read_metrics(run.path) if "distill_kl" in r]
    # the teacher is the student's own start: the KL starts at zero
    assert rows and rows[0]["distill_kl"] == pytest.approx(0.0, abs=1e-4)


def test_distill_refusals(tiny_model_dir, small_sft_file):
    with pytest.raises(RecipeError, match="distill.teacher"):
        parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, method="distill"))
    with pytest.raises(RecipeError, match="distill"):
        from tuneforge.train import refuse_unread_sections
        from tuneforge.methods import method_spec

        recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, distill={"alpha": 0.9}))
        refuse_unread_sections(recipe, method_spec("sft"))
