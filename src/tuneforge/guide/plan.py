"""`tuneforge plan`: how much GPU memory and time a run needs, for full fine-tuning, LoRA and QLoRA (and the recipe's
adapter type, or any listed with --adapters: GaLore, LISA, Spectrum, freeze, IA3, soft prompts ...), from a model
config alone (hub id, local folder, the embedded model, a recipe, or a reference size such as `llama-8b`).

This is the view: it builds the table of the three adapters on one GPU (`make_plan`) and prints it
(`render_plan`). The memory/time model itself -- the formulas, the GPU table, the model's shape, the fit verdict
and the one translation of a recipe into the model's keywords (`recipe_settings`) -- lives in tuneforge/memory.py
(and memory_shapes.py), where speed, guards and distributed use it too. The names below are re-exported from
there so `from tuneforge.guide.plan import plan_memory` (doctor, recommend, bench scripts) keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneforge import memory
from tuneforge.memory import (  # noqa: F401 -- re-exported for guide/doctor.py, guide/recommend.py, bench, tests
    GIB,
    GPUS,
    UTILISATION,
    GpuSpec,
    ModelShape,
    _first,
    _text_config,
    count_parameters,
    custom_gpu,
    default_gpu,
    estimate_seconds,
    find_gpu,
    fit_verdict,
    flops_per_token,
    is_reference_name,
    largest_batch,
    llama_shape,
    lora_parameters,
    meta_model,
    meta_shape,
    model_shape,
    nearest_reference,
    plan_memory,
    recipe_settings,
    reference_config,
)


def load_model_config(name: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """memory.load_model_config with tuneforge's own model names resolved (the embedded model, a .gguf file are
    converted to a checkpoint folder first): what `tuneforge plan`, the doctor and recommend read."""
    from tuneforge.models import resolve_model_source

    return memory.load_model_config(name, trust_remote_code=trust_remote_code, revision=revision,
                                    resolve_source=resolve_model_source)


# ---------------------------------------------------------------------------------------------------------------
# The plan: three adapters on one GPU


@dataclass
class Plan:
    model: str
    params_total: int
    gpu: GpuSpec
    settings: dict[str, Any]
    rows: list[dict[str, Any]]  # one per adapter: plan_memory + verdict + time
    activation_table: list[dict[str, Any]]
    tokens: float | None = None  # training tokens (recipe data x epochs) when known
    recipe_adapter: str | None = None
    notes: list[str] = field(default_factory=list)


def make_plan(source, *, gpu: str | GpuSpec | None = None, vram_gb: float | None = None, seq_len: int | None = None,
              batch_size: int | None = None, gradient_checkpointing: bool | None = None,
              tokens: float | None = None, adapters: tuple[str, ...] = ()) -> Plan:
    """Plan a recipe (path or Recipe) or a model (hub id, folder, embedded, reference size) on a GPU.

    For a recipe, its settings (max_length, batch_size, gradient checkpointing, optimizer, LoRA rank/targets,
    quantization) are used and its adapter row is marked; the training tokens come from its data when the data
    can be read (else time is given per million tokens). `vram_gb` overrides the GPU's memory. `adapters`: more
    adapter types to plan beside full, LoRA, QLoRA and the recipe's (e.g. ("ia3", "galore", "lisa")), each at its
    defaults (adapter_kinds.py; memory_adapters.py has their formulas).
    """
    from pathlib import Path

    from tuneforge.recipe import Recipe, load_recipe

    recipe = None
    if isinstance(source, Recipe):
        recipe = source
    elif isinstance(source, (str, Path)) and str(source).endswith((".yaml", ".yml")):
        recipe = load_recipe(source)
    if isinstance(gpu, GpuSpec):
        spec = gpu
    elif gpu:
        spec = find_gpu(gpu)
    else:
        spec = default_gpu() if vram_gb is None else None
    if vram_gb is not None:
        spec = GpuSpec(spec.name if spec and gpu else f"{vram_gb:g} GB GPU", float(vram_gb),
                       spec.bf16 if spec else True, spec.tflops if spec else 100.0)

    recipe_optimizer = None
    if recipe is not None:
        name = recipe.model.name
        config = load_model_config(name, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
        # the command line's --seq-len / --batch-size / --gradient-checkpointing replace the recipe's
        changes = {k: v for k, v in (("seq_len", seq_len), ("batch_size", batch_size)) if v}
        if gradient_checkpointing is not None:
            changes["gradient_checkpointing"] = gradient_checkpointing
        settings = recipe_settings(recipe, gpu=spec, **changes)
        # every row plans its own adapter; only the recipe's row keeps the recipe's optimizer (the others take
        # their adapter's default)
        recipe_adapter, dtype, recipe_optimizer = settings.pop("adapter"), settings.pop("dtype"), settings.pop("optimizer")
        if tokens is None:
            tokens = _recipe_tokens(recipe)
    else:
        name = str(source)
        config = source if not isinstance(source, (str, Path)) else load_model_config(str(source))
        name = name if isinstance(source, (str, Path)) else getattr(config, "_name_or_path", "config")
        settings = dict(seq_len=seq_len or 2048, batch_size=batch_size or 1,
                        gradient_checkpointing=bool(gradient_checkpointing))
        dtype = "bf16" if spec.bf16 else "fp16"
        recipe_adapter = None

    shape = model_shape(config)
    if shape.max_positions and settings["seq_len"] > shape.max_positions:
        settings["seq_len_warning"] = f"seq_len {settings['seq_len']} exceeds the model's context ({shape.max_positions})"
    rows = []
    extra = (recipe_adapter,) if recipe_adapter not in (None, "full", "lora", "qlora") else ()
    for adapter in ("full", "lora", "qlora", *extra, *[a for a in adapters if a not in ("full", "lora", "qlora", *extra)]):
        row_settings = {k: v for k, v in settings.items() if k != "seq_len_warning"}
        row_settings.update(adapter=adapter, dtype=dtype)
        if adapter != recipe_adapter:  # another type's row: its own defaults, the recipe's base precision
            row_settings.pop("quantize_base", None)
        if recipe is not None and adapter == recipe_adapter:
            row_settings["optimizer"] = recipe_optimizer
        estimate = plan_memory(shape, **row_settings)
        verdict = fit_verdict(shape, gpu=spec, **row_settings)
        step_tokens = tokens if tokens else 1e6
        seconds = estimate_seconds(shape, tokens=step_tokens, gpu=spec, adapter=adapter, seq_len=row_settings["seq_len"],
                                   gradient_checkpointing=row_settings["gradient_checkpointing"])
        rows.append({**estimate, **verdict, "seconds": seconds, "seconds_per": "run" if tokens else "1M tokens",
                     "recipe": adapter == recipe_adapter})
    table = []
    lengths = [s for s in (512, 1024, 2048, 4096, 8192) if not shape.max_positions or s <= shape.max_positions]
    for s in lengths:
        for b in (1, 4, 8):
            no_gc = plan_memory(shape, adapter="lora", seq_len=s, batch_size=b, dtype=dtype)["activations"]
            gc = plan_memory(shape, adapter="lora", seq_len=s, batch_size=b, dtype=dtype, gradient_checkpointing=True)["activations"]
            table.append({"seq_len": s, "batch_size": b, "activations_gib": no_gc / GIB, "activations_gc_gib": gc / GIB})
    return Plan(model=name, params_total=shape.params_total, gpu=spec, settings={**settings, "dtype": dtype},
                rows=rows, activation_table=table, tokens=tokens, recipe_adapter=recipe_adapter, notes=list(shape.notes))


def parse_adapter_list(text: str | None) -> tuple[str, ...]:
    """--adapters "ia3,galore" (or "all") -> the adapter types, each checked against adapter_kinds.ADAPTER_TYPES."""
    from tuneforge.adapter_kinds import ADAPTER_TYPES
    from tuneforge.errors import TuneforgeError

    if not text:
        return ()
    if text.strip() == "all":
        return tuple(t for t in ADAPTER_TYPES if t != "none")
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ADAPTER_TYPES]
    if unknown:
        raise TuneforgeError(f"unknown adapter type(s) {unknown}", where="--adapters",
                             fix=f"use some of {', '.join(ADAPTER_TYPES)}, or all")
    return names


def _recipe_tokens(recipe) -> float | None:
    """Training tokens = tokens of the prepared training set x epochs (or max_steps x tokens per step)."""
    try:
        from tuneforge.data.pipeline import prepare_data
        from tuneforge.models import load_tokenizer

        tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                                   trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
        stats = prepare_data(recipe, tokenizer).stats
    except Exception:
        return None
    t = recipe.train
    if t.max_steps:
        per_example = stats.train_tokens / max(1, stats.train_examples)
        return t.max_steps * t.batch_size * t.grad_accum * per_example
    return stats.train_tokens * t.epochs


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render_plan(console, plan: Plan) -> None:
    """Print the plan: a memory table per adapter, the verdicts with what to change, and activations by length."""
    from rich.table import Table

    s = plan.settings
    console.print(f"[bold]{plan.model}[/]: {plan.params_total / 1e9:.2f}B parameters; {plan.gpu.name} "
                  f"({plan.gpu.memory_gib:.0f} GiB); seq_len {s['seq_len']}, batch {s['batch_size']}, "
                  f"{s['dtype']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    if s.get("seq_len_warning"):
        console.print(f"[yellow]{s['seq_len_warning']}[/]")
    for note in plan.notes:
        console.print(f"[yellow]note: {note}[/]")
    table = Table(title="estimated peak GPU memory (GiB)")
    for column in ("", "weights", "grads", "optimizer", "activations", "LM head", "allocated", "on GPU", "verdict",
                   "max batch", "time"):
        table.add_column(column, justify="right")
    for row in plan.rows:
        label = row["adapter"] + (" (recipe)" if row["recipe"] else "")
        verdict = "[green]fits[/]" if row["fits"] else "[red]does not fit[/]"
        table.add_row(label, *(f"{row[k] / GIB:.1f}" for k in ("weights", "gradients", "optimizer_states",
                                                                   "activations", "lm_head", "total")),
                      f"{row['reserved_gib']:.1f}", verdict, str(row["largest_batch"]),
                      f"{format_duration(row['seconds'])}/{row['seconds_per']}" if row["seconds_per"] != "run"
                      else format_duration(row["seconds"]))
    console.print(table)
    for row in plan.rows:
        if not row["fits"]:
            console.print(f"[bold]{row['adapter']}[/] does not fit ({row['needed_gib']:.1f} > {row['available_gib']:.1f} GiB); "
                          "what would: " + "; ".join(row["changes"]))
    acts = Table(title="activations by sequence length and batch (LoRA, GiB): without / with gradient checkpointing")
    for column in ("seq_len", "batch", "no checkpointing", "checkpointing"):
        acts.add_column(column, justify="right")
    for entry in plan.activation_table:
        acts.add_row(str(entry["seq_len"]), str(entry["batch_size"]), f"{entry['activations_gib']:.2f}",
                     f"{entry['activations_gc_gib']:.2f}")
    console.print(acts)
    console.print("[dim]estimates (see tuneforge/memory.py for the formulas); time assumes "
                  f"{int(UTILISATION['lora'] * 100)}% ({int(UTILISATION['qlora'] * 100)}% QLoRA) of the GPU's bf16 peak[/]")
