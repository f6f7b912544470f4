"""The recipe schema: defaults per adapter type, strictness ("did you mean" with the YAML line), every problem
reported at once, `--set` overrides, shipped recipes, and the CLI's error path (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.errors import RecipeError
from tuneforge.recipe import apply_overrides, load_recipe, parse_recipe, recipe_to_yaml

ROOT = Path(__file__).resolve().parent.parent
TUNEFORGE = Path(sys.executable).parent / "tuneforge"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def minimal(**sections) -> dict:
    return {"name": "t", "data": {"train": "train.jsonl"}, **sections}


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


# --- defaults ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "lr", "optimizer"),
    [("lora", 2e-4, "adamw_torch"), ("qlora", 2e-4, "paged_adamw_8bit"), ("full", 2e-5, "adamw_torch"),
     ("none", 2e-5, "adamw_torch")],
)
def test_defaults_follow_the_adapter_type(adapter, lr, optimizer):
    recipe = parse_recipe(minimal(adapter={"type": adapter}))
    assert recipe.train.lr == lr
    assert recipe.train.optimizer == optimizer


def test_explicit_lr_and_optimizer_win_over_the_adapter_defaults():
    recipe = parse_recipe(minimal(adapter={"type": "qlora"}, train={"lr": 1e-5, "optimizer": "adamw_torch"}))
    assert recipe.train.lr == 1e-5
    assert recipe.train.optimizer == "adamw_torch"


def test_documented_production_defaults():
    recipe = parse_recipe(minimal())
    assert recipe.model.name == "embedded:smollm2-135m-instruct"
    assert recipe.method == "sft"
    assert (recipe.adapter.type, recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.dropout) == ("lora", 16, 32, 0.05)
    assert recipe.adapter.target_modules == "all-linear"
    assert (recipe.quant.bits, recipe.quant.type, recipe.quant.double_quant) == (4, "nf4", True)
    assert (recipe.train.scheduler, recipe.train.warmup) == ("cosine", 0.03)
    assert recipe.data.eval_fraction == 0.1 and recipe.data.dedup is True


def test_model_shorthand_string_is_the_model_name():
    recipe = parse_recipe(minimal(model="some/hub-model"))
    assert recipe.model.name == "some/hub-model"
    assert recipe.model.dtype == "auto"


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # PyYAML reads `1e-4` as a string; the schema must still take it as a number.
    recipe = load_recipe(write(tmp_path, "name: t\ndata:\n  train: x.jsonl\ntrain:\n  lr: 1e-4\n"))
    assert recipe.train.lr == pytest.approx(1e-4)
    assert isinstance(recipe.train.lr, float)


# --- strictness and messages ---------------------------------------------------------------------------------


def test_key_typo_gets_did_you_mean_with_the_yaml_line(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\ntrain:\n  epochs: 2\n  lrr: 1.0e-4\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    (problem,) = problems_of(excinfo)
    assert "`train.lrr`" in problem
    assert f"{path}:6" in problem
    assert "did you mean `train.lr`?" in problem


def test_top_level_typo_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\ntrian:\n  lr: 1.0e-4\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    (problem,) = problems_of(excinfo)
    assert "`trian`" in problem and f"{path}:4" in problem and "did you mean `train`?" in problem


def test_wrong_types_name_the_key_and_the_value(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\ntrain:\n  batch_size: four\nadapter:\n  r: 0\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    problems = problems_of(excinfo)
    assert len(problems) == 2
    batch = next(p for p in problems if "train.batch_size" in p)
    assert f"{path}:5" in batch and "integer" in batch and "'four'" in batch
    rank = next(p for p in problems if "adapter.r" in p)
    assert f"{path}:7" in rank and "greater than 0" in rank and "(got 0)" in rank


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "name: t\nmodel:\n  nme: x\ntrain:\n  batch_size: four\n  lrr: 1\neval:\n  metrics: [bleu]\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    problems = problems_of(excinfo)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for key in ("`model.nme`", "`train.batch_size`", "`train.lrr`", "`eval.metrics`", "unknown metric `bleu`", "`data`"):
        assert key in text
    assert "required key is missing" in text
    assert "5 problem(s)" in str(excinfo.value)


def test_literal_choices_are_listed():
    with pytest.raises(RecipeError) as excinfo:
        parse_recipe(minimal(adapter={"type": "lora2"}))
    (problem,) = problems_of(excinfo)
    assert "`adapter.type`" in problem and "'qlora'" in problem and "(got 'lora2')" in problem


def test_cross_field_error_names_its_key_and_line(tmp_path):
    path = write(tmp_path, "name: t\nmethod: cpt\ndata:\n  train: x.jsonl\n  format: messages\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    (problem,) = problems_of(excinfo)
    assert problem.startswith("`data.format`")
    assert f"{path}:5" in problem
    assert "Value error" not in problem


def test_run_name_must_be_a_plain_folder_name():
    with pytest.raises(RecipeError) as excinfo:
        parse_recipe({"name": "../escape", "data": {"train": "x.jsonl"}})
    assert "`name`" in problems_of(excinfo)[0] and "no '/'" in problems_of(excinfo)[0]


def test_duplicate_key_is_an_error_not_silently_dropped(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\nmethod: sft\ndata:\n  dedup: false\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    text = "\n".join(problems_of(excinfo))
    assert "`data`" in text and f"{path}:5" in text and "line 2" in text and "twice" in text


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: [x.jsonl\nadapter: {}\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    assert f"{path}:" in str(excinfo.value) and "not valid YAML" in str(excinfo.value)


def test_non_utf8_recipe_is_a_recipe_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: t\ndata:\n  train: caf\xe9.jsonl\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    assert f"{path}:3" in str(excinfo.value) and "UTF-8" in str(excinfo.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.yaml")


def test_a_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(write(tmp_path, "- name: t\n"))


# --- --set overrides -----------------------------------------------------------------------------------------


def test_overrides_parse_values_as_yaml():
    data = apply_overrides(minimal(), ["train.lr=1.0e-4", "train.packing=true", "adapter.target_modules=[q_proj, v_proj]",
                                        "data.eval="])
    assert data["train"] == {"lr": 1e-4, "packing": True}
    assert data["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["data"] == {"train": "train.jsonl", "eval": None}


@pytest.mark.parametrize("model", [None, "old/model", {"name": "old/model", "dtype": "bfloat16"}])
def test_set_model_sets_the_model_name(model):
    data = minimal() if model is None else minimal(model=model)
    recipe = parse_recipe(apply_overrides(data, ["model=HuggingFaceTB/SmolLM2-360M"]))
    assert recipe.model.name == "HuggingFaceTB/SmolLM2-360M"
    if isinstance(model, dict):
        assert recipe.model.dtype == "bfloat16"  # the rest of the section is kept


def test_set_inside_a_shorthand_model_keeps_its_name():
    recipe = parse_recipe(apply_overrides(minimal(model="old/model"), ["model.dtype=float32"]))
    assert (recipe.model.name, recipe.model.dtype) == ("old/model", "float32")


def test_overrides_through_load_recipe_resolve_defaults_again(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\n")
    recipe = load_recipe(path, ["adapter.type=full", "model=embedded:smollm2-135m-instruct"])
    assert recipe.adapter.type == "full" and recipe.train.lr == 2e-5
    recipe = load_recipe(path, ["adapter.type=qlora"])
    assert recipe.train.optimizer == "paged_adamw_8bit"


@pytest.mark.parametrize("item", ["train.lr", "=1", "train..lr=1", "train.lr.=1", "name=[unclosed"])
def test_bad_set_syntax_is_a_recipe_error(item):
    with pytest.raises(RecipeError) as excinfo:
        apply_overrides(minimal(), [item])
    (problem,) = problems_of(excinfo)
    assert f"--set {item!r}" in problem


def test_all_bad_set_items_are_reported_together():
    with pytest.raises(RecipeError) as excinfo:
        apply_overrides(minimal(), ["a", "train.lr=1", "b"])
    assert len(problems_of(excinfo)) == 2


def test_set_typo_names_the_set_and_suggests_the_key(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\ntrain:\n  epochs: 1\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, ["train.lrr=1e-4"])
    (problem,) = problems_of(excinfo)
    assert "`train.lrr`" in problem and "(--set train.lrr=1e-4)" in problem and "did you mean `train.lr`?" in problem
    assert f"{path}:" not in problem  # the key is not in the file, so no file line is claimed for it


# --- shipped recipes and round trip --------------------------------------------------------------------------

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.name
    assert recipe.train.lr > 0 and recipe.train.optimizer


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_resolved_recipe_round_trips(path):
    recipe = load_recipe(path)
    again = parse_recipe(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again.model_dump() == recipe.model_dump()


# --- the CLI's error path ------------------------------------------------------------------------------------


def run_cli(*args, cwd):
    # A wide console, so rich does not fold long temporary paths across lines in the captured output.
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run([str(TUNEFORGE), *args], capture_output=True, text=True, cwd=cwd, timeout=60, env=env)


def test_cli_train_with_a_typo_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\ntrain:\n  lrr: 1.0e-4\n")
    result = run_cli("train", str(path), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "train.lrr" in output and "did you mean" in output and f"{path.name}:5" in output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()  # a bad recipe never leaves a run directory behind


def test_cli_bad_set_and_non_utf8_recipe_exit_2_without_traceback(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train: x.jsonl\n")
    result = run_cli("train", str(path), "--set", "train.lr", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--set" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: \xff\n")
    result = run_cli("train", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "UTF-8" in result.stderr


def test_set_indexes_into_stages():
    """`--set stages.1.train.max_steps=60` (as recipes/qlora-sft-dpo.yaml shows) changes that stage only."""
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import load_recipe

    recipe = load_recipe("recipes/qlora-sft-dpo.yaml", ["stages.1.train.max_steps=60"])
    assert [stage.train.max_steps for stage in recipe.stage_recipes()] == [12, 60]
    with pytest.raises(RecipeError, match="stages has 2 entries"):
        load_recipe("recipes/qlora-sft-dpo.yaml", ["stages.5.train.max_steps=60"])


def test_recipe_loading_is_bounded(tmp_path):
    """An alias bomb, a recursive alias, deep nesting and an oversized file are each one RecipeError naming the file,
    at once; anchors within the bounds still work."""
    import time

    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    cases = {"bomb": "\n".join(bomb) + "\nname: t\ndata: {train: t.jsonl}\nstages: [*a8]\n",
             "recursive": "a: &a [*a]\nname: t\n", "deep": "name: t\nx: " + "[" * 1000 + "]" * 1000 + "\n",
             "huge": "name: t\n" + "#\n" * 600_000}
    for name, text in cases.items():
        path = write(tmp_path, text, f"{name}.yaml")
        start = time.perf_counter()
        with pytest.raises(RecipeError) as caught:
            load_recipe(path)
        # Bounded, not fast: unbounded, the bomb ran 38 s into a MemoryError; these take well under a second on an
        # idle machine, and the margin keeps a loaded CI machine from failing the test.
        assert time.perf_counter() - start < 20, name
        assert str(path) in caught.value.render(), name
    ok = write(tmp_path, "name: t\ndata: &d {train: t.jsonl}\nstages: [{name: a, data: *d}, {name: b, data: *d}]\n")
    assert [s["data"] for s in load_recipe(ok).stages] == [{"train": "t.jsonl"}] * 2


@pytest.mark.parametrize(("section", "key", "value", "says"), [
    ("train", "seed", -1, "greater than or equal to 0"),
    ("train", "seed", 2**32, "less than or equal to 4294967295"),
    ("train", "epochs", float("inf"), "finite"),
    ("train", "warmup", float("nan"), "finite"),
    ("train", "optimizer", "adam_w", "did you mean"),
    ("adapter", "r", 10**6, "less than or equal to 4096"),
])
def test_bounds_on_numbers_and_names(section, key, value, says):
    with pytest.raises(RecipeError, match=says):
        parse_recipe(minimal(**{section: {key: value}}))
    for name in ("a\x00b", "x" * 201):
        with pytest.raises(RecipeError, match="`name`"):
            parse_recipe({**minimal(), "name": name})
