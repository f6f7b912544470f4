"""Adapter checks that need the model's config or the data, run in train.py's check step (before the run directory
exists): a soft prompt that does not fit the model's context with the longest example, and AdaLoRA's schedule
length (filled into the run's recipe as adapter.total_step, so the saved recipe shows what ran)."""

from __future__ import annotations

from tuneforge.adapter_kinds import SOFT_PROMPTS
from tuneforge.errors import RecipeError


def model_context(recipe) -> int | None:
    from tuneforge.memory import recipe_model_config
    from tuneforge.models import resolve_model_source

    try:
        config = recipe_model_config(recipe, resolve_source=resolve_model_source)
    except Exception:  # the model's own loading reports an unreadable model with its fix, later
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def check_adapter_for_run(recipe, data, lengths: list[int] | None = None) -> None:
    """Raise RecipeError for what the adapter cannot do with this model and data; fill adapter.total_step."""
    adapter = recipe.adapter
    if adapter.type in SOFT_PROMPTS:
        context = model_context(recipe)
        longest = min(recipe.train.max_length, max(lengths)) if lengths else recipe.train.max_length
        if context and adapter.num_virtual_tokens >= context:
            raise RecipeError([f"`adapter.num_virtual_tokens`: {adapter.num_virtual_tokens} virtual tokens are longer "
                               f"than the model's context ({context} positions); use far fewer (8-100 is typical)"],
                              source=recipe.source_path)
        if context and adapter.num_virtual_tokens + longest > context:
            raise RecipeError([f"`adapter.num_virtual_tokens`: {adapter.num_virtual_tokens} virtual tokens + the "
                               f"longest example ({longest} tokens) exceed the model's context ({context}); lower "
                               f"num_virtual_tokens or train.max_length to at most {context - adapter.num_virtual_tokens}"],
                              source=recipe.source_path)
    if adapter.type == "adalora":
        from tuneforge.recipe_adapter import adalora_steps

        examples = len(data.train) if hasattr(data, "train") and hasattr(data.train, "__len__") else None
        steps = adalora_steps(recipe, examples)
        if steps is None:
            raise RecipeError(["`adapter.total_step`: AdaLoRA's budget schedule needs the run's step count, which "
                               "this data does not give; set train.max_steps (or adapter.total_step)"],
                              source=recipe.source_path)
        if adapter.tinit + adapter.tfinal >= steps:
            raise RecipeError([f"`adapter.tinit`: AdaLoRA's tinit + tfinal ({adapter.tinit} + {adapter.tfinal}) must "
                               f"be below the run's {steps} steps, or no budget is ever pruned; lower them"],
                              source=recipe.source_path)
        adapter.total_step = steps
