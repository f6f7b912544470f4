"""Checks of the adapter: LoRA target modules and modules_to_save against the model's modules (a model built on
the meta device, no weights), the LoRA rank against the adapted layers' sizes, new tokens LoRA cannot train, and
QLoRA's optimizer."""

from __future__ import annotations

import re

from tuneforge.guide.doctor.core import Context, Finding


def _module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _linear_names(model) -> list[str]:
    from tuneforge.adapters import linear_module_names

    return linear_module_names(model)


def _peft_matches(key: str, target: str) -> bool:
    """PEFT's rule for one name of a target list: the module path equals it or ends with "." + it."""
    return key == target or key.endswith("." + target)


def check_target_modules(ctx: Context):
    """Target modules that match nothing (issue: list what exists); PEFT matches a name against the end of each
    module path, or a single string as a regex against the full path."""
    if not ctx.uses_lora:
        return
    model = ctx.meta_model()
    if model is None:
        return
    import torch

    names = _module_names(model)
    modules = dict(model.named_modules())
    targets = ctx.recipe.adapter.target_modules
    if targets != "all-linear":
        if isinstance(targets, str):
            # PEFT reads a single string as a regular expression that must match a module's full path
            matched = [n for n in names if re.fullmatch(targets, n)]
            missing = [] if matched else [targets]
            as_suffix = not matched and any(n.endswith("." + targets) for n in names)
        else:
            matched = [n for n in names if any(_peft_matches(n, t) for t in targets)]
            missing = [t for t in targets if not any(_peft_matches(n, t) for n in names)]
            as_suffix = False
        if as_suffix:
            yield Finding("error", "target-modules-not-found",
                          f"adapter.target_modules is the single string {targets!r}, which PEFT reads as a regular "
                          "expression over full module paths (model.layers.0...), so it matches nothing",
                          "PEFT refuses to build the adapter: no module matched",
                          f"write it as a list: target_modules: [{targets}]", ctx.where("adapter.target_modules"))
        elif missing:
            yield Finding("error", "target-modules-not-found",
                          f"adapter.target_modules {missing} match no module of this model",
                          "PEFT refuses to build the adapter (or, when only some names match, adapts less than you think)",
                          f"use this model's linear layers: {_linear_names(model)}, or all-linear",
                          ctx.where("adapter.target_modules"))
        else:
            adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
            unsupported = sorted({n.split(".")[-1] for n in matched if not isinstance(modules[n], adaptable)
                                  and type(modules[n]).__name__ not in ("Conv1D", "Linear4bit", "Linear8bitLt")})
            if unsupported:
                yield Finding("error", "target-modules-not-found",
                              f"adapter.target_modules {unsupported} name blocks, not layers LoRA can adapt",
                              "LoRA wraps linear (and embedding/conv) layers; PEFT raises on other module types",
                              f"name the linear layers inside them: {_linear_names(model)}, or all-linear",
                              ctx.where("adapter.target_modules"))
    missing_save = [m for m in ctx.recipe.adapter.modules_to_save if not any(_peft_matches(n, m) for n in names)]
    if missing_save:
        top = sorted({n.split(".")[-1] for n in names if n.count(".") <= 1})
        yield Finding("error", "target-modules-not-found",
                      f"adapter.modules_to_save {missing_save} match no module of this model",
                      "those modules will not be trained; PEFT raises or silently skips them",
                      f"use names this model has, e.g. {top}", ctx.where("adapter.modules_to_save"))
    # runner.CHECKS (not this module) lists the checks; the rank check needs the same model, so it runs from here
    yield from check_lora_rank(ctx)


def _adapted_modules(model, targets) -> list[tuple[str, object]]:
    """(path, module) of the layers PEFT adapts for adapter.target_modules: all-linear = every linear layer but the
    output head; a list = paths equal to or ending in "." + a name; a single string = a regex over full paths."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        if targets == "all-linear":
            hit = module is not output and (isinstance(module, torch.nn.Linear)
                                            or type(module).__name__ in ("Linear4bit", "Linear8bitLt"))
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(_peft_matches(name, t) for t in targets)
        if hit:
            out.append((name, module))
    return out


def check_lora_rank(ctx: Context):
    """A LoRA update B @ A on a d_out x d_in layer has rank at most min(d_in, d_out): an adapter.r above the smallest
    adapted layer's size is no more expressive than full fine-tuning of that layer, and A and B grow with r (memory
    and time for nothing; an absurd r runs out of memory with advice that does not name it)."""
    if not ctx.uses_lora:
        return
    model = ctx.meta_model()
    if model is None:
        return
    r = ctx.recipe.adapter.r
    sizes = []
    for name, module in _adapted_modules(model, ctx.recipe.adapter.target_modules):
        weight = getattr(module, "weight", None)
        shape = tuple(getattr(weight, "shape", ()))
        if len(shape) == 2 and min(shape) > 0:
            sizes.append((min(shape), name, shape))
    if not sizes:
        return
    smallest, name, shape = min(sizes)
    if r > smallest:
        above = sum(1 for size, _, _ in sizes if r > size)
        yield Finding("error", "lora-rank-too-large",
                      f"adapter.r = {r} exceeds the smallest adapted layer: {name} is {shape[0]} x {shape[1]} "
                      f"(rank at most {smallest}); {above} of the {len(sizes)} adapted layers are smaller than r",
                      f"a rank-{r} update of a layer with {smallest} rows or columns has rank at most {smallest}, so it "
                      f"is no more expressive than full fine-tuning of that layer, while LoRA's A and B matrices (and "
                      f"their gradients and optimizer state) grow with r: memory and time for nothing",
                      f"set adapter.r to at most {smallest} (8-64 is typical), or adapter.type: full to train every "
                      f"weight", ctx.where("adapter.r"))


def _embedding_names(model) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    short = lambda module: names.get(id(module), "").split(".")[-1] or None  # noqa: E731
    return (short(inp) if inp is not None else None), (short(out) if out is not None else None)


def check_new_tokens(ctx: Context):
    """Seed 000 common mistakes: new tokens have random embeddings that LoRA cannot fix; add modules_to_save
    [embed_tokens, lm_head]. New tokens = the tokenizer's ids beyond the model's embedding rows."""
    if ctx.tokenizer is None or ctx.model_config is None:
        return
    from tuneforge.guide.plan import _text_config

    vocab_size = getattr(_text_config(ctx.model_config), "vocab_size", None)
    beyond = (len(ctx.tokenizer) - vocab_size) if vocab_size else 0
    if beyond <= 0:
        return
    extra = [ctx.tokenizer.convert_ids_to_tokens(i) for i in range(vocab_size, min(len(ctx.tokenizer), vocab_size + 5))]
    what = f"the tokenizer has {beyond} token(s) beyond the model's {vocab_size} embedding rows ({', '.join(map(repr, extra))})"
    model = ctx.meta_model()
    embed, head = _embedding_names(model) if model is not None else ("embed_tokens", "lm_head")
    wanted = [n for n in (embed, head) if n]
    if ctx.uses_lora:
        lacking = [n for n in wanted if n not in set(ctx.recipe.adapter.modules_to_save)]
        if lacking:
            yield Finding("error", "new-tokens-without-modules-to-save",
                          f"{what}, but adapter.modules_to_save lacks {lacking}",
                          "new tokens get randomly initialised embedding (and output) rows; LoRA freezes those "
                          "matrices, so the model can neither read nor write the new tokens",
                          f"set adapter.modules_to_save: {wanted}",
                          ctx.where("adapter.modules_to_save"))
    elif not (ctx.recipe.model.add_tokens or ctx.recipe.model.add_special_tokens):  # those grow the rows themselves
        yield Finding("error", "new-tokens-without-modules-to-save",
                      f"{what}: their ids are out of range for the embedding matrix",
                      "the first example that uses one fails with an index error (or reads another row on some kernels)",
                      "list them in model.add_tokens (tuneforge grows the embedding rows, mean-initialised)",
                      ctx.where("model.name"))


def check_qlora_optimizer(ctx: Context):
    """Seed 000 common mistakes: full optimizer state with QLoRA defeats the memory savings; use
    optim=paged_adamw_8bit."""
    if ctx.adapter != "qlora":
        return
    optimizer = str(ctx.recipe.train.optimizer or "")
    if optimizer and "8bit" not in optimizer and "paged" not in optimizer:
        yield Finding("warning", "qlora-optimizer",
                      f"QLoRA with optimizer {optimizer} (neither paged nor 8-bit)",
                      "optimizer states in fp32 are the memory spike QLoRA exists to avoid; a paged optimizer moves "
                      "them to CPU when the GPU fills up instead of running out of memory",
                      "set train.optimizer: paged_adamw_8bit (the QLoRA default)", ctx.where("train.optimizer"))
