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
