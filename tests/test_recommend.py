"""`tuneforge recommend`: the decision tree's leaves, the adapter chosen by memory, and every recipe it writes
parses (train accepts it) and passes the doctor's recipe-level checks."""

from __future__ import annotations

import io
import itertools

import pytest
import yaml

from tuneforge.guide.doctor import device_from_gpu, run_doctor
from tuneforge.guide.plan import reference_config
from tuneforge.guide.recommend import QUESTIONS, decide, recommend, recommend_interactive
from tuneforge.recipe import Recipe, parse_recipe


def parsed(answers: dict) -> tuple[Recipe, str, list[str]]:
    text, reasons = recommend(answers)
    assert text is not None, reasons
    return parse_recipe(yaml.safe_load(text)), text, reasons


def test_knowledge_goes_to_rag_and_tasks_to_prompting_first():
    text, reasons = recommend({"goal": "knowledge"})
    assert text is None and "RAG" in reasons[0]
    text, reasons = recommend({"goal": "style"})
    assert text is None and "few examples" in reasons[0]
    recipe, _, _ = parsed({"goal": "style", "tried_prompting": True, "gpu": "cpu"})
    assert recipe.method == "sft" and recipe.adapter.r == 8  # a style change needs little capacity


def test_method_by_goal():
    assert parsed({"goal": "chat", "gpu": "cpu"})[0].method == "sft"
    domain, text, _ = parsed({"goal": "domain", "gpu": "cpu"})
    assert domain.method == "cpt" and domain.data.format == "text" and "Next stage: SFT" in text
    prefs, text, reasons = parsed({"goal": "preferences", "model": "llama-8b", "gpu": "H100", "examples": 20000})
    assert prefs.method in ("sft", "dpo") and "DPO" in text and any("after SFT" in r for r in reasons)
    reasoning, text, _ = parsed({"goal": "reasoning", "gpu": "cpu"})
    assert reasoning.method == "sft" and "GRPO" in text
    _, _, reasons = parsed({"goal": "preferences", "dpo_underperformed": True, "gpu": "cpu"})
    assert any("PPO" in r for r in reasons)
    _, _, reasons = parsed({"goal": "preferences", "has_preference_data": False, "gpu": "cpu"})
    assert any("pairs" in r for r in reasons)


@pytest.mark.parametrize("model,gpu,adapter", [
    ("llama-8b", "H100", "lora"), ("llama-8b", "T4", "qlora"), ("llama-70b", "H100", "qlora"),
    ("llama-1b", "RTX 4090", "lora"), ("llama-70b", "L4", "qlora"), ("embedded:smollm2-135m-instruct", "cpu", "lora"),
])
def test_adapter_by_memory(model, gpu, adapter):
    recipe, text, reasons = parsed({"goal": "chat", "model": model, "gpu": gpu, "examples": 5000, "max_length": 2048})
    assert recipe.adapter.type == adapter
    if adapter == "qlora":
        assert recipe.train.optimizer == "paged_adamw_8bit"
    if model == "llama-70b" and gpu == "L4":
        assert any("does not fit" in r for r in reasons)


def test_full_fine_tuning_needs_much_data_and_a_lora_shortfall():
    answers = {"goal": "chat", "model": "llama-1b", "gpu": "H100", "examples": 200_000}
    assert parsed(answers)[0].adapter.type == "lora"
    full, _, reasons = parsed({**answers, "lora_insufficient": True})
    assert full.adapter.type == "full" and full.train.lr == 2e-5
    assert parsed({**answers, "examples": 5000, "lora_insufficient": True})[0].adapter.type == "lora"


def test_hyperparameters_follow_data_size():
    small = parsed({"goal": "chat", "gpu": "cpu", "examples": 300})[0]
    large = parsed({"goal": "chat", "gpu": "cpu", "examples": 200_000})[0]
    assert small.train.epochs == 3 and small.adapter.dropout == 0.1 and small.adapter.r == 8
    assert large.train.epochs == 1 and large.adapter.dropout == 0.0 and large.adapter.r == 32
    for recipe in (small, large):
        assert 16 <= recipe.train.batch_size * recipe.train.grad_accum <= 128


def test_reasons_cover_each_choice():
    decision = decide({"goal": "chat", "model": "llama-8b", "gpu": "L4", "examples": 5000})
    text = " ".join(decision.reasons)
    for word in ("SFT", "QLoRA" if decision.adapter == "qlora" else "LoRA", "epoch", "Learning rate", "Micro-batch", "rank"):
        assert word in text, word


GRID = list(itertools.product(
    ["style", "task", "chat", "preferences", "reasoning", "domain"],
    ["llama-1b", "llama-8b", "llama-70b", "embedded:smollm2-135m-instruct"],
    ["H100", "L4", "T4", "cpu"],
    [200, 5000, 150_000],
))


@pytest.mark.parametrize("goal,model,gpu,examples", GRID[::3] + GRID[1::7])
def test_every_recipe_parses_and_passes_the_doctor(goal, model, gpu, examples):
    answers = {"goal": goal, "model": model, "gpu": gpu, "examples": examples, "tried_prompting": True,
               "train": "data/my train.jsonl", "name": f"{goal}-{examples}"}
    text, reasons = recommend(answers)
    recipe = parse_recipe(yaml.safe_load(text))
    assert recipe.data.train == "data/my train.jsonl" and reasons
    device = device_from_gpu(gpu) if gpu != "cpu" else {"type": "cpu", "name": "CPU", "bf16": False, "count": 1}
    config = reference_config(model) if model.startswith("llama") else None
    findings = [f for f in run_doctor(recipe, model_config=config, device_info=device) if f.severity != "info"]
    allowed = {"memory-does-not-fit"} if (model == "llama-70b" and gpu in ("L4", "T4")) else set()
    if model != "embedded:smollm2-135m-instruct" and gpu == "cpu":
        allowed.add("memory-does-not-fit")
    assert {f.code for f in findings} <= allowed, [(f.code, f.message) for f in findings]


def test_recipe_file_loads_like_train_loads_it(tmp_path):
    from tuneforge.recipe import load_recipe

    text, _ = recommend({"goal": "chat", "model": "llama-8b", "gpu": "T4", "examples": 800, "eval": "data/held out.jsonl"})
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.data.eval == "data/held out.jsonl" and recipe.train.precision == "fp16"  # a T4 has no bf16
    assert recipe.model.dtype == "float16" and recipe.adapter.type in ("lora", "qlora")


def test_reference_sizes_become_real_model_ids():
    recipe = parsed({"goal": "chat", "model": "llama-8b", "gpu": "H100"})[0]
    assert recipe.model.name == "meta-llama/Llama-3.1-8B"
    recipe = parsed({"goal": "task", "tried_prompting": True, "model": "llama-8b", "gpu": "H100"})[0]
    assert recipe.model.name == "meta-llama/Llama-3.1-8B-Instruct"


def test_model_from_a_config_folder_and_vram(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**reference_config("llama-3b").to_dict()).save_pretrained(tmp_path)
    recipe = parsed({"goal": "chat", "model": str(tmp_path), "vram_gb": 8, "examples": 2000})[0]
    assert recipe.model.name == str(tmp_path) and recipe.adapter.type == "qlora"


def test_interactive_asks_only_what_applies():
    from rich.console import Console

    answers = "\n".join(["task", "y", "llama-8b", "H100", "3000", "1024", "data/t.jsonl", "", "my-run"]) + "\n"
    out = io.StringIO()
    text, reasons = recommend_interactive(Console(file=out, width=120), stream=io.StringIO(answers))
    expected, _ = recommend({"goal": "task", "tried_prompting": True, "model": "llama-8b", "gpu": "H100",
                             "examples": 3000, "max_length": 1024, "train": "data/t.jsonl", "name": "my-run"})
    assert text == expected
    asked = out.getvalue()
    assert "preference pairs" not in asked and "system prompt" in asked
    assert {q.key for q in QUESTIONS} >= {"goal", "model", "gpu", "examples", "max_length", "train", "eval", "name"}


def test_answers_given_up_front_take_their_questions_type():
    """`--answer dpo_underperformed=no` is no (any non-empty string used to count as yes); numbers are numbers; a
    yes/no question answered with something else is a located error."""
    from rich.console import Console

    from tuneforge.errors import RecipeError
    from tuneforge.guide.recommend import coerce_answers

    assert coerce_answers({"dpo_underperformed": "no", "tried_prompting": "Yes", "examples": "3,000"}) == \
        {"dpo_underperformed": False, "tried_prompting": True, "examples": 3000}
    with pytest.raises(RecipeError, match="dpo_underperformed=maybe: a yes/no question"):
        coerce_answers({"dpo_underperformed": "maybe"})
    given = {"goal": "task", "tried_prompting": "yes", "model": "llama-8b", "gpu": "H100", "examples": "3000",
             "max_length": "1024", "train": "data/t.jsonl", "eval": "", "name": "my-run"}
    text, _ = recommend_interactive(Console(file=io.StringIO(), width=120), answers=given, stream=io.StringIO(""))
    expected, _ = recommend({"goal": "task", "tried_prompting": True, "model": "llama-8b", "gpu": "H100",
                             "examples": 3000, "max_length": 1024, "train": "data/t.jsonl", "eval": "", "name": "my-run"})
    assert text == expected
    no_prompting = recommend({"goal": "task", "tried_prompting": False, "model": "llama-8b", "gpu": "H100"})[1]
    assert any("--answer tried_prompting=yes" in reason for reason in no_prompting)
