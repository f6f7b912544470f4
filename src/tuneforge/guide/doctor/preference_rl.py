"""Checks of preference and RL methods: they start from an SFT model, and the RL pitfalls (no KL penalty, a group
too small, a reward model trained from another base). Which methods these are comes from the method registry."""

from __future__ import annotations

import re
from pathlib import Path

from tuneforge.guide.doctor.core import Context, Finding
from tuneforge.methods import method_spec

# The methods whose rollouts are scored relative to their group (the group mean is the baseline).
GROUPED_METHODS = ("grpo", "rloo")


def needs_sft_start(method: str) -> bool:
    """Preference methods use the starting model as their reference, so they polish an SFT model; ORPO folds the SFT
    loss into its own and starts from a base model by design. RL polishes a policy that already answers (seed 001
    part 8: SFT -> reward model -> PPO; GRPO needs some correct samples in a group to learn anything)."""
    family = method_spec(method).family
    return (family == "preference" and method != "orpo") or family == "rl"


def _has_sft_start(ctx: Context) -> tuple[bool, bool]:
    """(evidence of an SFT starting point, certainty that the model is a base model)."""
    recipe = ctx.recipe
    if recipe.stages:
        names = [stage.get("method", ctx.method) for stage in recipe.stages]  # a stage keeps the recipe's method
        if "sft" in names and names.index("sft") < (names.index(ctx.method) if ctx.method in names else len(names)):
            return True, False
    if recipe.model.adapter:  # starts from a trained adapter (the SFT run before)
        return True, False
    name = str(recipe.model.name or "")
    path = Path(name)
    if (path / "recipe.yaml").exists() or (path / "adapter_config.json").exists() or (path.parent / "recipe.yaml").exists():
        return True, False
    if re.search(r"(instruct|chat|[-_]it\b|[-_]it[-_]|sft|dpo|assistant|embedded:)", name, re.IGNORECASE):
        return True, False
    template = getattr(ctx.tokenizer, "chat_template", None) if ctx.tokenizer is not None else None
    return False, ctx.tokenizer is not None and not template


def check_preference_start(ctx: Context):
    """Seed 000 common mistakes: DPO without an SFT base drifts unpredictably; always SFT first."""
    if not needs_sft_start(ctx.method):
        return
    evidence, surely_base = _has_sft_start(ctx)
    if evidence:
        return
    yield Finding("error" if surely_base else "warning", "dpo-without-sft",
                  f"method {ctx.method} starts from {ctx.recipe.model.name!r}, which does not look "
                  "like an SFT model" + (" (its tokenizer has no chat template: a base model)" if surely_base else ""),
                  f"{ctx.method} uses the starting model as its reference; from a base model the reference is far from "
                  "useful behaviour and training drifts unpredictably. Preference tuning is a polish, not a starter",
                  "run SFT first (stages: [sft, " + ctx.method + "]) and start from its model, or start from an "
                  "instruct checkpoint", ctx.where("model.name"))


def check_rl(ctx: Context):
    """Seed pitfalls of RL: no KL penalty (seed 003: the policy finds outputs that fool the reward), a group too small
    for GRPO's relative advantages, a PPO reward model trained from another base model, a reward model whose data
    has no held-out pairs (handled as a data error)."""
    method, rl = ctx.method, ctx.recipe.rl
    if ctx.family == "rl" and rl.kl_coef == 0:
        defaults = ", ".join(f"{m} {method_spec(m).kl:g}" for m in ("ppo", "grpo"))
        yield Finding("warning", "rl-no-kl", f"rl.kl_coef is 0 with method {method}: nothing holds the policy near "
                      "its reference", "without the KL penalty the policy drifts into outputs that score high but are "
                      "gibberish or reward hacks (seed 003: 'the KL penalty is critical')",
                      f"set rl.kl_coef > 0 ({defaults} are the defaults)", ctx.where("rl.kl_coef"))
    if method in GROUPED_METHODS and rl.num_generations < 4:
        yield Finding("warning", "rl-small-group", f"rl.num_generations is {rl.num_generations}",
                      "the group mean is the baseline of each completion's advantage; with 2-3 samples it is noisy and "
                      "groups often score all-equal, which teaches nothing", "use 4-16 (TRL's default is 8)",
                      ctx.where("rl.num_generations"))
    reward_run = rl.reward_model
    if method == "ppo" and reward_run and (Path(reward_run) / "recipe.yaml").is_file():
        import yaml

        try:
            trained = (yaml.safe_load((Path(reward_run) / "recipe.yaml").read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError):
            trained = {}
        base = (trained.get("model") or {}).get("name") if isinstance(trained.get("model"), dict) else trained.get("model")
        if base and str(base) != str(ctx.recipe.model.name):
            yield Finding("warning", "rl-reward-base", f"the reward model was trained from {base!r}, the policy is "
                          f"{ctx.recipe.model.name!r}", "PPO feeds the policy's token ids to the reward model: "
                          "it must share the tokenizer (a different vocabulary is refused when training starts)",
                          "train the reward model from the same base model as the policy", ctx.where("rl.reward_model"))
