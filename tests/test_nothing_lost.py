"""Nothing a user wrote is lost: `--overwrite` replaces only a folder tuneforge marked as a run directory and that holds
nothing but a run's own files; the current folder, a folder above it, home, a file, a link or a folder with foreign
files is refused (exit 2) before anything is deleted."""

from __future__ import annotations

import os

import pytest
import yaml
from rich.console import Console

from conftest import run_cli, tiny_recipe
from tuneforge.errors import RunDirError
from tuneforge.recipe import parse_recipe
from tuneforge.run import RUN_MARKER
from tuneforge.train import train


def _raw(model_dir, data_file, **sections):
    return tiny_recipe(model_dir, data_file, train={"max_steps": 1},
                       eval={"baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 1,
                             "max_new_tokens": 2}, **sections)


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    return run_cli(monkeypatch, capsys, *args, with_stdout=True)


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text("name: mine\n")
    (path / "thesis.tex").write_text("\\chapter{Results}\n")
    (path / "data.jsonl").write_text('{"text": "mine"}\n')
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _recipe_file(tmp_path, raw):
    path = tmp_path / "recipe-in.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_overwrite_refuses_a_folder_tuneforge_did_not_mark(tmp_path, tiny_model_dir, small_sft_file, monkeypatch,
                                                           capsys):
    target = tmp_path / "thesis"
    before = _user_folder(target)
    recipe = _recipe_file(tmp_path, _raw(tiny_model_dir, small_sft_file))
    code, text = _cli(monkeypatch, capsys, "train", str(recipe), "--output", str(target), "--overwrite", "--no-doctor")
    assert code == 2
    assert "not a run directory tuneforge made" in text
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_overwrite_refuses_the_current_folder_and_its_parents(tmp_path, tiny_model_dir, small_sft_file, monkeypatch,
                                                              capsys):
    work = tmp_path / "project"
    before = _user_folder(work)
    (work / RUN_MARKER).write_text("{}")  # even a marked folder: it is where the user stands
    before[RUN_MARKER] = b"{}"
    recipe = _recipe_file(tmp_path, _raw(tiny_model_dir, small_sft_file))
    monkeypatch.chdir(work)
    for output in (".", str(tmp_path)):
        code, text = _cli(monkeypatch, capsys, "train", str(recipe), "--output", output, "--overwrite", "--no-doctor")
        assert code == 2, text
        assert "current folder" in text
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


def test_overwrite_refuses_a_run_directory_holding_foreign_files(tmp_path, tiny_model_dir, small_sft_file):
    raw = _raw(tiny_model_dir, small_sft_file)
    out = tmp_path / "run"
    train(parse_recipe(raw), output=str(out), console=Console(quiet=True), doctor=False)
    assert (out / RUN_MARKER).is_file()
    (out / "notes.md").write_text("my notes on this run\n")
    with pytest.raises(RunDirError, match=r"holds files tuneforge did not write \(notes.md\)"):
        train(parse_recipe(raw), output=str(out), overwrite=True, console=Console(quiet=True), doctor=False)
    assert (out / "notes.md").read_text() == "my notes on this run\n"
    assert (out / "adapter").is_dir()


def test_overwrite_replaces_a_marked_run_and_says_what_it_removes(tmp_path, tiny_model_dir, small_sft_file):
    raw = _raw(tiny_model_dir, small_sft_file)
    out = tmp_path / "run"
    first = train(parse_recipe(raw), output=str(out), console=Console(quiet=True), doctor=False)
    started = first.read_json("status.json")["started"]
    console = Console(record=True, width=300)
    second = train(parse_recipe(raw), output=str(out), overwrite=True, console=console, doctor=False)
    text = console.export_text()
    assert f"--overwrite: removing the earlier run {out}" in text
    assert "adapter/" in text and "recipe.yaml" in text
    assert second.status == "completed" and second.read_json("status.json")["started"] > started


def test_multi_stage_overwrite_keeps_the_users_recipe(tmp_path, tiny_model_dir, small_sft_file, monkeypatch, capsys):
    target = tmp_path / "mine"
    before = _user_folder(target)
    raw = _raw(tiny_model_dir, small_sft_file)
    raw["stages"] = [{"name": "a", "method": "sft"}, {"name": "b", "method": "sft"}]
    recipe = _recipe_file(tmp_path, raw)
    code, text = _cli(monkeypatch, capsys, "train", str(recipe), "--output", str(target), "--overwrite", "--no-doctor")
    assert code == 2, text
    assert "not a run directory tuneforge made" in text
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_output_at_a_file_or_a_link_is_refused(tmp_path, tiny_model_dir, small_sft_file, monkeypatch, capsys):
    recipe = _recipe_file(tmp_path, _raw(tiny_model_dir, small_sft_file))
    a_file = tmp_path / "results.csv"
    a_file.write_text("a,b\n1,2\n")
    real = tmp_path / "real"
    _user_folder(real)
    link = tmp_path / "link"
    os.symlink(real, link)
    for output, says in ((a_file, "is a file"), (link, "symbolic link")):
        for extra in ([], ["--overwrite"]):
            code, text = _cli(monkeypatch, capsys, "train", str(recipe), "--output", str(output), *extra, "--no-doctor")
            assert code == 2, text
            assert says in text
    assert a_file.read_text() == "a,b\n1,2\n"
    assert (real / "thesis.tex").exists() and link.is_symlink()


def test_a_huge_held_out_prompt_is_cut_to_the_context_and_counted(tmp_path, tiny_model_dir, small_sft_file):
    """Scoring keeps the last tokens of a prompt longer than the model's context (512 here) and says how many were
    cut, instead of running out of memory after training."""
    import json

    lines = small_sft_file.read_text().splitlines()[:3]
    huge = {"messages": [{"role": "user", "content": "word " * 200_000 + "Extract the order."},
                         {"role": "assistant", "content": "{}"}]}
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(lines + [json.dumps(huge)]) + "\n")
    raw = _raw(tiny_model_dir, small_sft_file)
    raw["data"] = {"train": str(small_sft_file), "eval": str(eval_file)}
    raw["eval"].update(baseline=True, max_examples=10)
    console = Console(record=True, width=300)
    run = train(parse_recipe(raw), output=str(tmp_path / "run"), console=console, doctor=False)
    assert run.status == "completed" and (run.path / "adapter").is_dir()
    for name in ("baseline", "tuned"):
        result = run.read_json(f"eval/{name}.json")
        assert result["n"] == 4 and result["truncated_prompts"] == 1, name
    assert "1 prompt(s) longer than the model's context kept their last tokens" in console.export_text()


def test_prompt_cut_keeps_the_end_of_the_prompt(smol_tokenizer):
    from tuneforge.evaluate.generation import encode_prompts

    prompt = "start " * 5000 + "the question<|im_start|>assistant\n"
    (ids,), cut = encode_prompts(smol_tokenizer, [prompt], limit=20)
    assert cut == 1 and len(ids) == 20
    assert smol_tokenizer.decode(ids).endswith("the question<|im_start|>assistant\n")
    (short,), none = encode_prompts(smol_tokenizer, ["hello"], limit=20)
    assert none == 0 and short == smol_tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_a_huge_training_line_is_cut_before_it_is_tokenized(smol_tokenizer):
    """A 5 MB message never reaches the tokenizer whole: at most max_length * CHARS_PER_TOKEN_BOUND characters of
    it do; the example is marked truncated and holds max_length tokens, as before."""
    from tuneforge.data.template import CHARS_PER_TOKEN_BOUND, tokenize_example

    seen = []
    original = type(smol_tokenizer).__call__

    class Recording(type(smol_tokenizer)):
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text) if isinstance(text, str) else max(len(t) for t in text))
            return original(self, text, *args, **kwargs)

    tokenizer = smol_tokenizer.__class__.__new__(Recording)
    tokenizer.__dict__.update(smol_tokenizer.__dict__)
    example = {"messages": [{"role": "user", "content": "x" * 5_000_000},
                            {"role": "assistant", "content": "the answer"}], "where": "train.jsonl:1"}
    item = tokenize_example(tokenizer, example, max_length=64)
    assert item.truncated and len(item.input_ids) == 64
    assert seen and max(seen) < 64 * CHARS_PER_TOKEN_BOUND + 1000
    text_item = tokenize_example(tokenizer, {"text": "y" * 5_000_000, "where": "t:1"}, max_length=32)
    assert text_item.truncated and len(text_item.input_ids) <= 32
