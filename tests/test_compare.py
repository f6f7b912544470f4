"""`tuneforge compare`: the same recipe through several adaptation methods, each its own run, one report."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli, tiny_recipe


def test_method_names_are_checked():
    from tuneforge.compare.menu import EVERY, adapter_for, parse_methods
    from tuneforge.errors import TuneforgeError

    assert parse_methods("lora, ia3") == ["lora", "ia3"]
    assert parse_methods("all") == list(EVERY) and "bottleneck" in EVERY and "galore" in EVERY
    assert adapter_for("dora") == {"type": "lora", "use_dora": True}
    assert adapter_for("ptuning_v2") == {"type": "prefix_tuning", "prefix_projection": True}
    with pytest.raises(TuneforgeError) as info:
        parse_methods("lora,loar")
    assert "loar" in str(info.value) and "--methods" in info.value.render()
    with pytest.raises(TuneforgeError):
        parse_methods("lora,lora")


def test_each_method_gets_the_recipe_but_its_own_adapter_and_rate(tmp_path, tiny_model_dir, small_sft_file):
    from tuneforge.compare.runs import method_recipes

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "lora", "r": 4},
                                               train={"lr": 5e-4, "optimizer": "adamw_torch", "max_steps": 7})))
    recipes = method_recipes(path, ["lora", "prompt_tuning", "galore"], ["train.batch_size=2"])
    assert recipes["prompt_tuning"]["adapter"] == {"type": "prompt_tuning"}  # r=4 is not carried to other types
    assert recipes["lora"]["adapter"] == {"type": "lora"}
    for recipe in recipes.values():
        assert recipe["train"]["max_steps"] == 7 and recipe["train"]["batch_size"] == 2
        assert "lr" not in recipe["train"] and "optimizer" not in recipe["train"]
    assert recipes["galore"]["name"] == "tiny-galore"


def test_a_method_the_recipe_cannot_run_fails_before_any_training(tmp_path, tiny_model_dir, small_sft_file):
    from tuneforge.compare.runs import run_comparison
    from tuneforge.errors import RecipeError

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file, train={"packing": True})))
    with pytest.raises(RecipeError) as info:
        run_comparison(path, ["lora", "prefix_tuning"], tmp_path / "out")
    assert "prefix_tuning:" in " ".join(info.value.problems) and "train.packing" in " ".join(info.value.problems)
    assert not (tmp_path / "out").exists()


def test_compare_runs_each_method_and_writes_one_report(tmp_path, tiny_model_dir, small_sft_file, monkeypatch,
                                                        capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 2},
                                               eval={"forgetting": False, "max_examples": 2, "max_new_tokens": 2,
                                                     "few_shot": 1})))
    out = tmp_path / "cmp"
    code, text = run_cli(monkeypatch, capsys, "compare", str(path), "--methods", "lora,ia3", "--output", str(out),
                         "--no-doctor", with_stdout=True)
    assert code == 0, text[-2000:]
    report = json.loads((out / "compare.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["lora", "ia3"] and all(r["status"] == "completed" for r in rows.values())
    assert rows["lora"]["trainable_params"] == 32768 and rows["ia3"]["trainable_params"] == 384  # pinned (tiny model)
    assert rows["ia3"]["lr"] == 3e-3 and rows["lora"]["lr"] == 2e-4  # each method's own default rate
    assert rows["ia3"]["artifact_mb"] < rows["lora"]["artifact_mb"]  # 384 vs 32,768 parameters saved
    for row in rows.values():
        assert row["peak_memory_gb"] > 0.1 and row["peak_memory_kind"] == "rss" and row["step_seconds"] > 0
        assert row["metric"] == "exact_match" and row["tuned_vs_base"] is not None
        assert row["eval_loss_tuned"] is not None and row["steps"] == 2
        assert (out / row["method"] / "summary.json").exists()
    markdown = (out / "compare.md").read_text()
    assert "| lora | lora |" in markdown and "| ia3 | ia3 |" in markdown and "tuneforge compare" in markdown
    assert (out / "compare.png").stat().st_size > 10_000 and "<table>" in (out / "compare.html").read_text()
    # again: completed runs are reused, not trained again
    started = {m: (out / m / "summary.json").stat().st_mtime for m in rows}
    code, _ = run_cli(monkeypatch, capsys, "compare", str(path), "--methods", "lora,ia3", "--output", str(out),
                      "--no-doctor")
    assert code == 0
    assert {m: (out / m / "summary.json").stat().st_mtime for m in rows} == started
    again = json.loads((out / "compare.json").read_text())
    assert all(r["reused"] for r in again["methods"]) and again["rows"][0]["peak_memory_gb"] > 0.1
