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
    assert common_arguments(shuffled, Run(), "cpu")["train_sampling_strategy"] == "random"
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
