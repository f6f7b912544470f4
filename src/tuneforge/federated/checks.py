"""What a federated or per-tenant recipe asks of the rest of the recipe, checked before a run directory exists: every
key these runs cannot honour is refused, naming the key and what to do instead."""

from __future__ import annotations

from tuneforge.errors import RecipeError

SUPPORTED_FAMILIES = ("supervised",)  # sft, cpt, dft: one loss on the client's own records
# What crosses the client boundary: LoRA tensors, or a soft prompt (prompt_tuning: the virtual tokens' embeddings)
ADAPTER_TYPES = ("lora", "qlora", "prompt_tuning")


def _changed(section, keys) -> list[str]:
    defaults = type(section)()
    return [k for k in keys if getattr(section, k) != getattr(defaults, k)]


def federated_problems(recipe) -> list[str]:
    """Problems with a recipe that has a `federated:` section (empty when it can run)."""
    from tuneforge.methods import method_names, method_spec
    from tuneforge.ranks import is_launched

    fed, problems = recipe.federated, []
    mode = fed.mode
    spec = method_spec(recipe.method)
    if spec.family not in SUPPORTED_FAMILIES:
        usable = ", ".join(n for n in method_names() if method_spec(n).family in SUPPORTED_FAMILIES)
        problems.append(f"`method`: {recipe.method} is not supported with federated: (mode {mode}); each client "
                        f"trains one loss on its own records: use {usable}")
    if recipe.adapter.type not in ADAPTER_TYPES:
        if recipe.uses_peft:
            why = "is not one of the adapters these runs exchange and aggregate"
        else:
            why = ("would send every weight of the model across the client boundary" if mode == "federated"
                   else "would copy the whole model per tenant")
        problems.append(f"`adapter.type`: {recipe.adapter.type} {why}; federated and per-tenant runs train a LoRA "
                        "adapter or a soft prompt: set adapter.type: lora, qlora or prompt_tuning")
    if recipe.adapter.modules_to_save:
        problems.append("`adapter.modules_to_save`: a trained embedding / output layer changes only the rows of tokens "
                        "in a client's records, so its update reveals which tokens a client holds; federated and "
                        "per-tenant runs train LoRA tensors only: remove it")
    if recipe.stages:
        problems.append("`stages`: a federated run is not a multi-stage run; train the stages first and start the "
                        "federated recipe from the last one with model.adapter")
    if is_launched():
        problems.append("`federated`: federated runs place their clients themselves (Flower); do not start them with "
                        "--gpus / --cpu-processes")
    if mode == "federated":
        for key in _changed(recipe.train, ("max_steps", "epochs")):
            problems.append(f"`train.{key}`: a federated run trains federated.local_steps (or local_epochs) per client "
                            f"per round, for federated.rounds rounds; remove train.{key}")
    for key in _changed(recipe.train, ("save_every", "save_total_limit", "eval_every", "early_stopping", "oom_retry")):
        why = {"save_every": "the global adapter is checkpointed after every round (per tenant: after each tenant)",
               "save_total_limit": "every round's checkpoint is kept (resume needs the last complete one)",
               "eval_every": "every round is scored on each client's held-out records and the global held-out set",
               "early_stopping": "rounds do not stop early", "oom_retry": "clients do not retry out of memory"}[key]
        problems.append(f"`train.{key}`: not used by {mode} runs ({why}); remove it")
    extra = [t for t in recipe.train.report_to if t != "tensorboard"]
    if extra:
        problems.append(f"`train.report_to`: {extra[0]} is not fed by {mode} runs (round scores go to summary.json, "
                        "report.html and tensorboard); keep [tensorboard] or []")
    if recipe.eval.lm_eval_tasks:
        problems.append(f"`eval.lm_eval_tasks`: not run by {mode} runs; remove it (score the saved adapter with "
                        "tuneforge eval instead)")
    if mode == "per_tenant" and recipe.data.eval:
        problems.append("`data.eval`: per-tenant adapters are each scored on their own tenant's held-out records "
                        "(data.eval_fraction of them); remove data.eval")
    return problems


def check_recipe(recipe) -> None:
    problems = federated_problems(recipe)
    if problems:
        raise RecipeError(problems, source=recipe.source_path)
