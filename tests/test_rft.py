"""method: rft (issue #25): rounds of sample -> score with rl.rewards -> keep -> SFT on the tiny random Llama, the
selection rule by hand, what each round records, and the refusals before a run exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_metrics, tiny_recipe

from tuneforge.errors import RecipeError, RunDirError
from tuneforge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
VERIFIABLE = ROOT / "data" / "verifiable"


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("rft")
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("\n".join((VERIFIABLE / "train.jsonl").read_text().splitlines()[:6]) + "\n")
    held.write_text("\n".join((VERIFIABLE / "eval.jsonl").read_text().splitlines()[:4]) + "\n")
    return train, held


@pytest.fixture(scope="module")
def always_one(tmp_path_factory) -> Path:
    """A custom reward that accepts every answer (so the counts below are exact whatever the tiny model says)."""
    path = tmp_path_factory.mktemp("reward") / "always.py"
    path.write_text("def score(prompts, completions, **columns):\n    return [1.0 for _ in completions]\n")
    return path


def rft_recipe(model_dir, files, rewards, **sections) -> dict:
    train, held = files
    rft = {"rounds": 2, "samples_per_prompt": 3, **sections.pop("rft", {})}
    recipe = tiny_recipe(model_dir, train, method="rft", rft=rft,
                         rl={"max_new_tokens": 6, "eval_prompts": 4, "rewards": rewards},
                         train={"max_steps": 2, "batch_size": 2}, eval={"forgetting": False, "batch_size": 6},
                         **sections)
    recipe["data"] = {"train": str(train), "eval": str(held)}
    return recipe


def run(tmp_path, data: dict, name: str):
    from rich.console import Console

    from tuneforge.train import train

    return train(parse_recipe(data), output=str(tmp_path / name), console=Console(quiet=True), doctor=False).path


def test_selection_keeps_the_best_passing_answer_or_every_distinct_passing_one():
    from tuneforge.methods.rft import select

    totals = [[0.5, 1.5, 1.0], [0.0, 0.2, 0.9], [1.0, 1.0, 1.2]]
    answers = [["a", "b", "c"], ["d", "e", "f"], ["g", "g ", "h"]]
    assert select(totals, answers, keep="best", threshold=1.0) == [(0, "b"), (2, "h")]
    # passing: b and c of prompt 0; "g" and "g " are the same answer (whitespace), kept once
    assert select(totals, answers, keep="passing", threshold=1.0) == [(0, "b"), (0, "c"), (2, "g"), (2, "h")]
    assert select(totals, answers, keep="best", threshold=2.0) == []


def test_rounds_sample_keep_and_train(tmp_path, tiny_model_dir, prompt_files, always_one):
    rewards = [{"name": "custom", "options": {"path": str(always_one), "function": "score"}},
               {"name": "regex", "weight": 0.5, "options": {"pattern": "Answer:"}}]
    path = run(tmp_path, rft_recipe(tiny_model_dir, prompt_files, rewards), "rft")
    summary = json.loads((path / "summary.json").read_text())
    rounds = summary["rft"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:  # 6 prompts x 3 samples, every one passes; best keeps one per prompt
        assert (row["prompts"], row["samples"], row["passing"], row["acceptance_rate"], row["kept"]) == (6, 18, 18, 100.0, 6)
        assert row["steps"] == 2 and row["held_out"]["n"] == 4
        assert set(row["held_out"]["per_reward"]) == {"score", "regex"}
    # steps are numbered across rounds in metrics.jsonl, each row saying its round
    losses = [r for r in read_metrics(path) if "loss" in r and "rft_round" in r]
    assert [(r["step"], r["rft_round"]) for r in losses] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert summary["steps"] == 4
    rewards_json = json.loads((path / "eval" / "rewards.json").read_text())
    assert rewards_json["after"]["mean_reward"] == rounds[-1]["held_out"]["mean_reward"]  # the last round is "after"
    assert rewards_json["before"]["n"] == 4
    assert json.loads((path / "eval" / "rft_rounds.json").read_text()) == rounds
    assert (path / "adapter" / "adapter_model.safetensors").exists()
    html = (path / "report.html").read_text()
    assert "Rejection-sampling rounds" in html and (path / "plots" / "rft.png").exists()


def test_passing_keeps_distinct_answers_and_nothing_passing_trains_nothing(tmp_path, tiny_model_dir, prompt_files,
                                                                           always_one):
    rewards = [{"name": "custom", "options": {"path": str(always_one), "function": "score"}}]
    path = run(tmp_path, rft_recipe(tiny_model_dir, prompt_files, rewards, rft={"rounds": 1, "keep": "passing"}),
               "passing")
    row = json.loads((path / "summary.json").read_text())["rft"]["rounds"][0]
    assert 6 <= row["kept"] <= 18 and row["passing"] == 18 and row["prompts_solved"] == 6
    none = run(tmp_path, rft_recipe(tiny_model_dir, prompt_files, rewards, rft={"rounds": 2, "threshold": 2.0}), "none")
    summary = json.loads((none / "summary.json").read_text())
    assert [(r["passing"], r["kept"], r["steps"]) for r in summary["rft"]["rounds"]] == [(0, 0, 0), (0, 0, 0)]
    assert summary["steps"] == 0 and summary["rl"]["after"]["n"] == 4


def test_bad_recipes_are_refused_before_a_run_exists(tmp_path, tiny_model_dir, prompt_files, always_one):
    rewards = [{"name": "exact_answer"}]
    base = rft_recipe(tiny_model_dir, prompt_files, rewards)
    for change, key, words in (
            ({"rl": {"max_new_tokens": 6, "rewards": []}}, "rl.rewards", "needs at least one reward"),
            ({"rl": {"rewards": rewards, "num_generations": 4}}, "rl.num_generations", "set rft.samples_per_prompt"),
            ({"rl": {"rewards": rewards, "kl_coef": 0.1}}, "rl.kl_coef", "does not read rl.kl_coef"),
            ({"train": {"save_every": 2}}, "train.save_every", "restarts rather than resumes"),
            ({"train": {"eval_every": 2}}, "train.eval_every", "no held-out loss"),
            ({"rft": {"keep": "all"}}, "rft.keep", "best"),
            ({"rft": {"samples_per_prompt": 0}}, "rft.samples_per_prompt", "greater than or equal to 1")):
        data = {**base, **{k: ({**base[k], **v} if isinstance(base.get(k), dict) else v) for k, v in change.items()}}
        with pytest.raises(RecipeError) as caught:
            parse_recipe(data)
        assert key in str(caught.value) and words in str(caught.value), str(caught.value)
    from tuneforge.train import train

    with pytest.raises(RecipeError, match=r"rft.rounds.*method sft does not read the rft: section \(it is for rft\)"):
        train(parse_recipe(tiny_recipe(tiny_model_dir, prompt_files[0], rft={"rounds": 5})), output=str(tmp_path / "x"))
    with pytest.raises(RunDirError, match="method rft cannot resume"):
        train(parse_recipe(base), output=str(tmp_path / "never"), resume=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "never").exists()
