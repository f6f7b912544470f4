"""Bad input ends in a located exit 2 (issue "Nothing lost", items 5, 6, 10, 11, 12b): each case drives the real CLI
in this process (`run_cli`) and asserts exit code 2, a message that names the file or key, no traceback, and no run
directory left behind (the recipes write under their own `output_dir`, which must not appear)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import run_cli, tiny_recipe


def _raw(model_dir, data_file, runs: Path, **sections) -> dict:
    """A tiny, fast recipe whose run directories go under `runs`."""
    raw = tiny_recipe(model_dir, data_file, train={"max_steps": 1},
                      eval={"baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 1,
                            "max_new_tokens": 2}, **sections)
    raw["output_dir"] = str(runs)
    return raw


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _refused(monkeypatch, capsys, *args, says: str | list[str], runs: Path | None = None) -> str:
    """Run `tuneforge ARGS`: exit 2, every text of `says` in the message, no traceback, nothing under `runs`."""
    code, text = run_cli(monkeypatch, capsys, *args, with_stdout=True)
    assert code == 2, text
    for part in [says] if isinstance(says, str) else says:
        assert part in text, (part, text)
    assert "Traceback" not in text
    if runs is not None:
        assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))
    return text


# ---------------------------------------------------------------------------------------------------------------
# item 5: recipe loading is bounded


def _alias_bomb(levels: int = 9) -> str:
    """`levels` anchors of nine aliases each: 9**levels values once expanded, ~500 bytes on disk."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: bomb\ndata: {{train: t.jsonl}}\nstages: [*a{levels - 1}]\n"


@pytest.mark.parametrize("command", ["train", "doctor"])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, monkeypatch, capsys, command):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_alias_bomb(), encoding="utf-8")
    assert recipe.stat().st_size < 1000
    start = time.perf_counter()
    _refused(monkeypatch, capsys, command, str(recipe), says=[str(recipe), "aliases expanded", "10,000"],
             runs=tmp_path / "runs")
    assert time.perf_counter() - start < 20  # was: MemoryError after 38 s; here a few milliseconds (margin for load)


@pytest.mark.parametrize(("text", "says"), [
    ("a: &a [*a]\nname: x\ndata: {train: t.jsonl}\n", "recursive"),
    ("name: x\ndata: {train: t.jsonl}\nstages: " + "[" * 60 + "]" * 60 + "\n", "deeper than 50"),
    ("name: x\ndata: {train: t.jsonl}\nstages: " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply"),
], ids=["recursive-alias", "depth-60", "depth-5000"])
def test_recursive_or_deep_yaml_is_refused(tmp_path, monkeypatch, capsys, text, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    _refused(monkeypatch, capsys, "train", str(recipe), says=[str(recipe), says], runs=tmp_path / "runs")


def test_oversized_recipe_file_is_refused(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("name: x\ndata: {train: t.jsonl}\n" + "# padding\n" * 200_000, encoding="utf-8")
    _refused(monkeypatch, capsys, "train", str(recipe), says=[str(recipe), "at most 1,000,000 bytes"],
             runs=tmp_path / "runs")


def test_alias_bomb_in_a_set_value_is_refused(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file):
    runs = tmp_path / "runs"
    recipe = _write(tmp_path / "r.yaml", _raw(tiny_model_dir, small_sft_file, runs))
    bomb = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x]"] + ["*a0"] * 8) + "]"
    for level in range(1, 6):
        bomb = f"[&a{level} {bomb}, " + ", ".join([f"*a{level}"] * 8) + "]"
    _refused(monkeypatch, capsys, "train", str(recipe), "--set", f"eval.metrics={bomb}", says=["--set", "aliases"],
             runs=runs)


def test_anchors_within_bounds_still_load(tmp_path):
    from tuneforge.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: &d {train: t.jsonl}\nstages: [{name: a, data: *d}]\n", encoding="utf-8")
    assert load_recipe(recipe).stages[0]["data"] == {"train": "t.jsonl"}


# ---------------------------------------------------------------------------------------------------------------
# item 10: tracebacks that become located errors


@pytest.fixture
def broken_models(tmp_path, tiny_model_dir) -> dict[str, Path]:
    """Copies of the tiny model with a truncated and a garbage model.safetensors."""
    out = {}
    for kind in ("truncated", "garbage"):
        folder = tmp_path / f"model-{kind}"
        shutil.copytree(tiny_model_dir, folder)
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x00not safetensors" * 500)
        out[kind] = folder
    return out


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_safetensors_in_train(tmp_path, monkeypatch, capsys, broken_models, small_sft_file, kind):
    runs = tmp_path / "runs"
    recipe = _write(tmp_path / "r.yaml", _raw(broken_models[kind], small_sft_file, runs))
    for extra in ([], ["--no-doctor"]):
        _refused(monkeypatch, capsys, "train", str(recipe), *extra,
                 says=[str(broken_models[kind] / "model.safetensors"), "corrupt or truncated", "model.name"], runs=runs)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_safetensors_in_generate(monkeypatch, capsys, broken_models, kind):
    _refused(monkeypatch, capsys, "generate", str(broken_models[kind]), "--prompt", "hi",
             says=[str(broken_models[kind] / "model.safetensors"), "corrupt or truncated"])


def test_unknown_optimizer_with_did_you_mean(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file):
    runs = tmp_path / "runs"
    raw = _raw(tiny_model_dir, small_sft_file, runs)
    raw["train"]["optimizer"] = "adamw_torh"
    recipe = _write(tmp_path / "r.yaml", raw)
    _refused(monkeypatch, capsys, "train", str(recipe),  # doctor on
             says=["`train.optimizer`", f"{recipe}:", "unknown optimizer 'adamw_torh'", "did you mean 'adamw_torch'"],
             runs=runs)
    raw["train"]["optimizer"] = "adafactor"  # a name transformers knows, not in the fast list, still loads
    from tuneforge.recipe import load_recipe

    assert load_recipe(_write(tmp_path / "ok.yaml", raw)).train.optimizer == "adafactor"
    raw["train"]["optimizer"] = "schedule_free_adamw"
    assert load_recipe(_write(tmp_path / "ok.yaml", raw)).train.optimizer == "schedule_free_adamw"


@pytest.mark.parametrize(("key", "value", "says"), [
    ("seed", "-1", "greater than or equal to 0"),
    ("seed", "1.0e+20", "integer"),
    ("seed", "100000000000000000000", "less than or equal to 4294967295"),
    ("seed", "4294967296", "less than or equal to 4294967295"),
    ("epochs", ".inf", "finite number"),
    ("epochs", ".nan", "finite number"),
    ("warmup", ".inf", "finite number"),
    ("warmup", ".nan", "finite number"),
    ("lr", "-.inf", "finite number"),
])
def test_out_of_range_numbers(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file, key, value, says):
    runs = tmp_path / "runs"
    recipe = _write(tmp_path / "r.yaml", _raw(tiny_model_dir, small_sft_file, runs))
    _refused(monkeypatch, capsys, "train", str(recipe), "--set", f"train.{key}={value}",
             says=[f"`train.{key}`", f"--set train.{key}={value}", says], runs=runs)
    # and written in the file: located by its line
    raw = _raw(tiny_model_dir, small_sft_file, runs)
    raw["train"][key] = "VALUE"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False).replace("VALUE", value), encoding="utf-8")
    _refused(monkeypatch, capsys, "train", str(recipe), says=[f"`train.{key}`", f"{recipe}:", says], runs=runs)


def test_non_finite_floats_are_refused_in_every_section():
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import parse_recipe

    for section, key in (("data", "eval_fraction"), ("adapter", "dropout"), ("preference", "beta"),
                         ("rl", "temperature"), ("eval", "forgetting_threshold"), ("speed", "memory_fraction")):
        method = {"preference": "dpo", "rl": "grpo"}.get(section, "sft")
        raw = {"name": "x", "method": method, "data": {"train": "t.jsonl"}}
        raw.setdefault(section, {})[key] = float("inf")
        with pytest.raises(RecipeError, match=f"`{section}.{key}`.*finite"):
            parse_recipe(raw)


@pytest.mark.parametrize(("name", "says"), [
    ('"run\\0one"', "control character(s) U+0000"),
    ('"tab\\there"', "control character(s) U+0009"),
    ("x" * 300, "must be at most 200 bytes"),
    ("é" * 150, "must be at most 200 bytes"),
], ids=["nul", "tab", "300-chars", "300-bytes"])
def test_bad_run_names(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file, name, says):
    runs = tmp_path / "runs"
    text = yaml.safe_dump(_raw(tiny_model_dir, small_sft_file, runs), sort_keys=False).replace("name: tiny", f"name: {name}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    _refused(monkeypatch, capsys, "train", str(recipe), says=["`name`", f"{recipe}:1", says], runs=runs)


@pytest.fixture
def evil_pickle_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """A model folder whose pytorch_model.bin runs `touch MARKER` when unpickled; (folder, marker)."""
    import torch

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil-model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(tiny_model_dir / name, folder / name)
    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")
    return folder, marker


def test_malicious_pickle_under_allow_pickle(tmp_path, monkeypatch, capsys, evil_pickle_model, small_sft_file):
    folder, marker = evil_pickle_model
    runs = tmp_path / "runs"
    recipe = _write(tmp_path / "r.yaml", _raw(tmp_path, small_sft_file, runs,
                                              model={"name": str(folder), "allow_pickle": True}))
    for extra in ([], ["--no-doctor"]):
        _refused(monkeypatch, capsys, "train", str(recipe), *extra,
                 says=[str(folder / "pytorch_model.bin"), "refused to unpickle", "model.allow_pickle"], runs=runs)
    # and where the preflight is bypassed (the Python API), loading refuses it the same way
    from tuneforge.errors import ModelError
    from tuneforge.models import load_base_model
    from tuneforge.recipe import ModelSection

    with pytest.raises(ModelError, match="refused to unpickle"):
        load_base_model(ModelSection(name=str(folder), allow_pickle=True), device="cpu")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# item 6: trust_remote_code never comes from a run directory


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, small_sft_file):
    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    base = tmp_path_factory.mktemp("trusted")
    raw = _raw(tiny_model_dir, small_sft_file, base / "runs")
    return train(parse_recipe(raw), output=str(base / "run"), console=Console(quiet=True), doctor=False).path


@pytest.fixture
def remote_code_run(tmp_path, finished_run, tiny_model_dir) -> tuple[Path, Path]:
    """A copy of a finished run whose recipe.yaml says trust_remote_code: true, over a base model folder whose config
    maps AutoModelForCausalLM to shipped code that touches a marker file when imported; (run, marker)."""
    marker = tmp_path / "REMOTE-CODE-RAN"
    model = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                   "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    run = tmp_path / "downloaded-run"
    shutil.copytree(finished_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(model)
    recipe["model"]["trust_remote_code"] = True
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run, marker


@pytest.mark.parametrize("command", ["generate", "eval", "chat", "merge", "serve", "export", "combine"])
def test_run_directory_cannot_turn_on_remote_code(tmp_path, monkeypatch, capsys, remote_code_run, small_sft_file,
                                                  command):
    run, marker = remote_code_run
    extra = {"generate": ["--prompt", "hi"], "eval": ["--data", str(small_sft_file), "--max-examples", "1"],
             "chat": [], "merge": ["--output", str(tmp_path / "merged")], "serve": ["--port", "0"],
             "export": ["--format", "gguf", "--output", str(tmp_path / "merged" / "x.gguf")],
             "combine": [str(run), "--method", "linear", "--output", str(tmp_path / "merged")]}[command]
    _refused(monkeypatch, capsys, command, str(run), *extra,
             says=[str(run / "recipe.yaml"), "trust_remote_code: true", "pass --trust-remote-code"])
    assert not marker.exists()
    assert not (tmp_path / "merged").exists()


def test_trust_remote_code_flag_is_explicit(monkeypatch, capsys, finished_run, tmp_path):
    """The flag exists on every command that loads a run; with it, a run that asks for remote code loads (the tiny
    Llama ships none, so nothing runs), and the flag alone does not change a run that never asked."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, text = run_cli(monkeypatch, capsys, "generate", str(run), "--prompt", "hi", "--max-new-tokens", "2",
                         "--trust-remote-code", with_stdout=True)
    assert code == 0, text
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["trust_remote_code"] = True
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, text = run_cli(monkeypatch, capsys, "generate", str(run), "--prompt", "hi", "--max-new-tokens", "2",
                         "--trust-remote-code", with_stdout=True)
    assert code == 0, text
    for command in ("eval", "chat", "merge"):
        code, text = run_cli(monkeypatch, capsys, command, "--help", with_stdout=True)
        assert "--trust-remote-code" in text, command


# ---------------------------------------------------------------------------------------------------------------
# item 11: an absurd LoRA rank


def test_lora_rank_above_the_layer_sizes(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file):
    runs = tmp_path / "runs"
    recipe = _write(tmp_path / "r.yaml", _raw(tiny_model_dir, small_sft_file, runs, adapter={"type": "lora", "r": 4000}))
    # the tiny Llama's smallest adapted layer is k_proj/v_proj, 32 x 64
    _refused(monkeypatch, capsys, "doctor", str(recipe),
             says=["lora-rank-too-large", "adapter.r = 4000", "32 x 64", f"{recipe}:", "at most 32"], runs=runs)
    _refused(monkeypatch, capsys, "train", str(recipe), says=["lora-rank-too-large", "adapter.r"], runs=runs)
    _refused(monkeypatch, capsys, "train", str(recipe), "--set", "adapter.r=1000000",
             says=["`adapter.r`", "--set adapter.r=1000000", "less than or equal to 4096"], runs=runs)


# ---------------------------------------------------------------------------------------------------------------
# item 12b: rich markup does not swallow bracketed user text


def test_bracketed_set_values_are_shown(tmp_path, monkeypatch, capsys, tiny_model_dir, small_sft_file):
    runs = tmp_path / "runs"
    recipe = _write(tmp_path / "r.yaml", _raw(tiny_model_dir, small_sft_file, runs))
    _refused(monkeypatch, capsys, "train", str(recipe), "--set", "eval.metrics=[bleu]",
             says=["--set eval.metrics=[bleu]", "unknown metric", "['bleu']"], runs=runs)
    _refused(monkeypatch, capsys, "doctor", str(recipe), "--set", "eval.metrics=[bleu]",
             says=["--set eval.metrics=[bleu]"], runs=runs)
    _refused(monkeypatch, capsys, "train", str(recipe), "--set", "name=[bold]x",
             says=["[bold]x"], runs=runs)
