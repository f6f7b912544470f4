"""Reward models and RL through `train` on the tiny random model: a few steps of reward, grpo, rloo, online_dpo, ppo
and gkd with finite losses, the run directory each writes, the recipe's RL checks, and one end-to-end toy GRPO run
on the embedded model (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_metrics, tiny_recipe

from tuneforge.errors import RecipeError
from tuneforge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
PREFERENCE = ROOT / "data" / "preference"
VERIFIABLE = ROOT / "data" / "verifiable"


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    lines = (VERIFIABLE / "train.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    lines = (PREFERENCE / "train.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    path = tmp_path_factory.mktemp("rl") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_recipe(tmp_path, data: dict, name: str):
    from rich.console import Console

    from tuneforge.train import train

    recipe = parse_recipe(data)
    return train(recipe, output=str(tmp_path / name), console=Console(quiet=True), doctor=False)


def losses(run_path: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in read_metrics(run_path) if key in row and not row.get("final")]


def rl_recipe(model_dir, data_file, method, **sections):
    rl = {"num_generations": 2, "max_new_tokens": 8, "eval_prompts": 4,
          "rewards": [{"name": "exact_answer", "options": {"fallback_last_number": True}},
                      {"name": "regex", "weight": 0.5, "options": {"pattern": "Answer:"}}]}
    rl.update(sections.pop("rl", {}))
    return tiny_recipe(model_dir, data_file, method=method, rl=rl, train={"max_steps": 2, "batch_size": 4},
                       eval={"forgetting": False}, **sections)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir, pair_file):
    tmp = tmp_path_factory.mktemp("reward")
    data = tiny_recipe(tiny_model_dir, pair_file, method="reward", train={"max_steps": 3, "batch_size": 4},
                       rl={"eval_prompts": 8})
    return run_recipe(tmp, data, "reward").path


def test_reward_model_trains_and_reports_pairwise_accuracy(reward_run):
    values = losses(reward_run)
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    result = json.loads((reward_run / "eval" / "reward.json").read_text())
    for side in ("before", "after"):
        assert result[side]["n"] >= 1 and 0 <= result[side]["accuracy"] <= 100
    summary = json.loads((reward_run / "summary.json").read_text())
    assert summary["reward_model"]["after"] == result["after"] and summary["steps"] == 3
    config = json.loads((reward_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"  # the score head is saved with the adapter (modules_to_save)


def test_saved_reward_model_scores_texts_as_a_judge(reward_run):
    from tuneforge.methods.reward import load_reward_model, score_texts

    model, tokenizer = load_reward_model(str(reward_run), device="cpu")
    scores = score_texts(model, tokenizer, ["Answer: 4.", "Well, let me think about it at length."])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_methods_take_steps_with_finite_losses(tmp_path, tiny_model_dir, prompt_file, method):
    run = run_recipe(tmp_path, rl_recipe(tiny_model_dir, prompt_file, method), method).path
    rows = [r for r in read_metrics(run) if "reward" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(f"rewards/{name}/mean" in rows[0] for name in ("exact_answer", "regex"))  # each reward logged
    result = json.loads((run / "eval" / "rewards.json").read_text())
    for side in ("before", "after"):
        assert result[side]["n"] == 4 and set(result[side]["per_reward"]) == {"exact_answer", "regex"}
        assert result[side]["accuracy_reward"] == "exact_answer"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "report.html").exists()


def test_online_dpo_takes_steps(tmp_path, tiny_model_dir, prompt_file):
    run = run_recipe(tmp_path, rl_recipe(tiny_model_dir, prompt_file, "online_dpo"), "odpo").path
    values = losses(run)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert json.loads((run / "eval" / "rewards.json").read_text())["after"]["n"] == 4


def test_ppo_runs_with_a_reward_model_and_bounded_kl(tmp_path, tiny_model_dir, prompt_file, reward_run):
    """tuneforge's PPO loop: a few updates against a trained reward model, every logged quantity finite, KL bounded,
    the reference is the adapter switched off (no second policy), the adapter saved, the report plots the curves."""
    data = rl_recipe(tiny_model_dir, prompt_file, "ppo", rl={"reward_model": str(reward_run), "rewards": [],
                                                             "ppo_epochs": 2, "num_mini_batches": 2})
    run = run_recipe(tmp_path, data, "ppo").path
    rows = [r for r in read_metrics(run) if "objective/kl" in r]
    assert len(rows) == 2
    for row in rows:
        for key in ("objective/kl", "objective/entropy", "objective/scores", "loss/value_avg", "loss/policy_avg",
                    "policy/clipfrac_avg", "val/ratio"):
            assert math.isfinite(row[key]), key
        assert 0.5 < row["val/ratio"] < 2.0, row  # old and new log-probs describe the same policy (no dropout)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kl"]["n"] == 2 and abs(summary["kl"]["max"]) < 50
    assert summary["rl"]["after"]["per_reward"].keys() == {"reward_model"}  # scored by the reward model
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert "rl.png" in plots


def test_ppo_pieces_by_hand():
    """GAE, the KL estimators and the clipped losses against values worked out by hand."""
    import torch

    from tuneforge.methods.ppo import gae, kl_per_token, ppo_losses

    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])  # the 4th position is past the answer: ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas: t2 = 1 - .5 = .5; t1 = 0 + .5 - .5 = 0; t0 = 0. A2 = .5, A1 = 0 + .5*.5 = .25, A0 = .125
    assert torch.allclose(advantages, torch.tensor([[0.125, 0.25, 0.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.625, 0.75, 1.0, 0.0]]))
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([1.0]))
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.tensor([math.exp(-1) - 1 + 1]))
    one = torch.ones(1, 1)
    # ratio e^0.5 = 1.65 with advantage 1: clipped at 1.2 -> loss -1.2; clip fraction 1
    policy, value, clipfrac, _ = ppo_losses(torch.tensor([[0.5]]), torch.zeros(1, 1), one, torch.tensor([[2.0]]),
                                            torch.zeros(1, 1), one, one, clip_range=0.2, value_clip=0.2)
    assert math.isclose(policy.item(), -1.2, rel_tol=1e-6) and clipfrac.item() == 1.0
    # value 2.0 vs old 0 clipped to 0.2: max((2-1)^2, (0.2-1)^2) / 2 = 0.5
    assert math.isclose(value.item(), 0.5, rel_tol=1e-6)
    # a negative advantage with ratio below 1 - clip: the clipped (pessimistic) term is taken
    policy, *_ = ppo_losses(torch.tensor([[-0.5]]), torch.zeros(1, 1), -one, torch.zeros(1, 1), torch.zeros(1, 1),
                            torch.zeros(1, 1), one, clip_range=0.2, value_clip=0.2)
    assert math.isclose(policy.item(), 0.8, rel_tol=1e-6)


def test_gkd_distils_from_a_teacher(tmp_path, tiny_model_dir, small_sft_file):
    data = tiny_recipe(tiny_model_dir, small_sft_file, method="gkd", train={"max_steps": 2, "batch_size": 4},
                       rl={"teacher": str(tiny_model_dir), "max_new_tokens": 8, "gkd_lambda": 0.5},
                       eval={"forgetting": False, "baseline": False})
    run = run_recipe(tmp_path, data, "gkd").path
    values = losses(run)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert (run / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("rl, method, key, message", [
    ({}, "ppo", "rl.reward_model", "train one with method: reward"),
    ({}, "grpo", "rl.rewards", "needs at least one reward"),
    ({}, "gkd", "rl.teacher", "set rl.teacher"),
    ({"rewards": [{"name": "regex", "options": {"pattern": "x"}}], "num_generations": 3}, "grpo", "rl.num_generations",
     "must be a multiple of it"),
    ({"reward_model": "r", "num_mini_batches": 3}, "ppo", "rl.num_mini_batches", "must divide"),
    ({"reward_model": "r", "use_vllm": True}, "ppo", "rl.use_vllm", "no vLLM path"),
])
def test_rl_recipe_checks(rl, method, key, message):
    data = {"name": "x", "method": method, "data": {"train": "t.jsonl"}, "train": {"batch_size": 4, "grad_accum": 1},
            "rl": rl}
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert f"`{key}`" in str(info.value) and message in str(info.value)


def test_rl_defaults_per_method():
    base = {"name": "x", "data": {"train": "t.jsonl"}, "train": {"batch_size": 8}}
    ppo = parse_recipe({**base, "method": "ppo", "rl": {"reward_model": "r"}})
    assert (ppo.rl.kl_coef, ppo.rl.clip_range, ppo.rl.value_clip, ppo.rl.gamma, ppo.rl.lam, ppo.rl.ppo_epochs,
            ppo.rl.num_mini_batches) == (0.05, 0.2, 0.2, 1.0, 0.95, 4, 4)  # seed 000 step 7
    assert ppo.train.lr == 1e-4  # LoRA: 10x the seed's full-model 1e-5
    grpo = parse_recipe({**base, "method": "grpo", "rl": {"rewards": [{"name": "exact_answer"}]}})
    assert grpo.rl.kl_coef == 0.04 and grpo.rl.num_generations == 8 and grpo.train.lr == 1e-5


def test_prompt_data_errors_name_the_line(tmp_path, smol_tokenizer):
    from tuneforge.data.prompts import prepare_prompt_data
    from tuneforge.errors import DataError

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?"}\n{"prompt": "3+3?", "answer": 6}\n')
    recipe = parse_recipe({"name": "x", "method": "grpo", "data": {"train": str(path), "eval": str(path)},
                           "train": {"batch_size": 8}, "rl": {"rewards": [{"name": "exact_answer"}]}})
    with pytest.raises(DataError) as info:
        prepare_prompt_data(recipe, smol_tokenizer, lambda v: v)
    assert f"{path}:2" in str(info.value) and "missing answer" in str(info.value)
    path.write_text('{"question": "1+1?"}\n')
    with pytest.raises(DataError, match="needs a `prompt`"):
        prepare_prompt_data(recipe, smol_tokenizer, lambda v: v)


@pytest.mark.slow
def test_grpo_toy_run_on_the_embedded_model(tmp_path):
    """End to end through the CLI: GRPO on the shipped verifiable task, shortened to one step (CPU minutes)."""
    out = tmp_path / "grpo"
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", str(ROOT / "recipes" / "grpo.yaml"), "--output", str(out),
         "--set", "train.max_steps=1", "--set", "train.batch_size=4", "--set", "rl.num_generations=2",
         "--set", "rl.max_new_tokens=16", "--set", "rl.eval_prompts=4", "--set", "data.max_examples=16"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    before, after = summary["rl"]["before"], summary["rl"]["after"]
    assert before["n"] == after["n"] == 4
    # the base instruct model already solves some of these: the rewards are wired to real answers
    assert before["per_reward"]["exact_answer"] > 0 and 0 <= after["mean_reward"] <= 1.5
    row = next(r for r in read_metrics(out) if "reward" in r)
    assert math.isfinite(row["loss"]) and "rewards/exact_answer/mean" in row
    assert "held-out reward (start)" in proc.stdout and "held-out reward (tuned)" in proc.stdout
    assert (out / "report.html").exists()


def test_a_policy_cannot_start_from_a_reward_run(reward_run):
    from tuneforge.methods import method_spec
    from tuneforge.train import check_start_adapter

    recipe = parse_recipe({"name": "x", "method": "ppo", "data": {"train": "t.jsonl"}, "train": {"batch_size": 4},
                           "model": {"adapter": str(reward_run)}, "rl": {"reward_model": str(reward_run)}})
    with pytest.raises(RecipeError, match="model.adapter.*is a reward model"):
        check_start_adapter(recipe, method_spec("ppo"))


def test_doctor_flags_rl_pitfalls():
    from tuneforge.guide.doctor import run_doctor

    recipe = parse_recipe({"name": "x", "method": "grpo", "model": "some-org/base-model", "data": {"train": "t.jsonl"},
                           "train": {"batch_size": 4}, "rl": {"kl_coef": 0, "num_generations": 2,
                                                               "rewards": [{"name": "exact_answer"}]}})
    codes = {f.code for f in run_doctor(recipe, tokenizer=None, data=None, model_config=None,
                                        device_info={"type": "cpu", "name": "CPU", "bf16": False, "count": 1})}
    assert {"rl-no-kl", "rl-small-group", "dpo-without-sft"} <= codes
