"""Checks of the hardware: precision against the GPU (bf16 or not, CPU), and the memory plan against the GPU's
memory; and the device a recipe is checked for (this machine, or a GPU of the plan's table)."""

from __future__ import annotations

from tuneforge.guide.doctor.core import Context, Finding


def detect_device() -> dict:
    """{'type': 'cuda'|'cpu', 'name', 'memory_gib', 'bf16', 'count'} for the local machine."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {"type": "cpu", "name": "CPU", "bf16": False, "count": 1}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30,
                "bf16": bool(torch.cuda.is_bf16_supported()), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": "CPU", "bf16": False, "count": 1}


def device_from_gpu(name: str, count: int = 1) -> dict:
    """device_info for a GPU of the plan's table ('H100', 'T4', ...), to check a recipe for a machine you are not on."""
    from tuneforge.guide.plan import find_gpu

    gpu = find_gpu(name)
    return {"type": "cuda", "name": gpu.name, "memory_gib": gpu.memory_gib, "bf16": gpu.bf16, "count": count}


def _precision(ctx: Context) -> tuple[str, str]:
    """(training precision, weights dtype) as the recipe asks, 'auto' resolved against the device."""
    precision, weights = ctx.recipe.train.precision, ctx.recipe.model.dtype
    bf16 = bool(ctx.device_info and ctx.device_info.get("bf16"))
    if precision == "auto":
        precision = "bf16" if ctx.on_gpu and bf16 else "fp32"
    if weights == "auto":
        weights = "bfloat16" if ctx.on_gpu and bf16 else "float32"
    return precision, weights


def check_precision(ctx: Context):
    """Seed 000 common mistakes, "forgetting bf16 / fp16": fp32 OOMs; bf16 if available (no loss scaling needed);
    fp16 needs care; CPU keeps fp32."""
    if not ctx.device_info:
        return
    precision, weights = _precision(ctx)
    name = ctx.device_info.get("name", "this GPU")
    compute = ctx.recipe.quant.compute_dtype
    if ctx.on_gpu and ctx.device_info.get("bf16"):
        if precision == "fp32" or weights == "float32":
            key, value = ("train.precision", ctx.recipe.train.precision) if precision == "fp32" else ("model.dtype", ctx.recipe.model.dtype)
            yield Finding("warning", "fp32-on-bf16-gpu",
                          f"training in fp32 on {name}, which supports bf16 ({key} = {value})",
                          "fp32 doubles weight, gradient and activation memory (a 7B model OOMs even on large GPUs) "
                          "and runs at a fraction of the tensor-core speed; bf16 needs no loss scaling",
                          f"remove {key} (auto picks bf16 here) or set it to bf16", ctx.where(key))
        if precision == "fp16" or weights == "float16" or (ctx.adapter == "qlora" and compute == "float16"):
            key = "train.precision" if precision == "fp16" else ("model.dtype" if weights == "float16" else "quant.compute_dtype")
            yield Finding("warning", "fp16-on-bf16-gpu", f"fp16 on {name}, which supports bf16 ({key})",
                          "fp16's narrow exponent range overflows and needs loss scaling; bf16 has fp32's range at the "
                          "same speed and memory",
                          f"set {key} to bf16 (or auto)", ctx.where(key))
    elif ctx.on_gpu:
        if precision == "bf16" or weights == "bfloat16" or compute == "bfloat16":
            key = "train.precision" if precision == "bf16" else ("model.dtype" if weights == "bfloat16" else "quant.compute_dtype")
            yield Finding("error", "bf16-unsupported", f"bf16 requested but {name} has no bf16 support",
                          "the run fails at start, or emulates bf16 at a fraction of the speed",
                          "use fp16 (with loss scaling) or fp32 on this GPU", ctx.where(key))
        elif precision == "fp32":
            yield Finding("info", "fp32-on-fp16-gpu", f"{name} has no bf16; the run trains in fp32",
                          "fp16 mixed precision halves activation memory and uses the tensor cores",
                          "set train.precision: fp16 if memory is tight", ctx.where("train.precision"))
    else:
        if precision in ("bf16", "fp16"):
            yield Finding("warning", "fp16-on-bf16-gpu" if precision == "fp16" else "fp32-on-bf16-gpu",
                          f"train.precision {precision} on a CPU",
                          "CPUs have no fast half-precision training path; it is slower and less precise than fp32",
                          "remove train.precision (auto keeps fp32 on CPU)", ctx.where("train.precision"))
        if ctx.adapter == "qlora":
            yield Finding("warning", "qlora-on-cpu", "QLoRA on a CPU",
                          "4-bit matmuls are GPU kernels; on a CPU they run a slow fallback and save nothing useful",
                          "use adapter.type: lora on CPU, QLoRA on a GPU", ctx.where("adapter.type"))


def check_memory(ctx: Context):
    """The plan's estimate against the GPU's memory (tuneforge plan)."""
    if not ctx.on_gpu or ctx.model_config is None or not ctx.device_info.get("memory_gib"):
        return
    from tuneforge.guide.plan import GpuSpec, fit_verdict

    recipe = ctx.recipe
    try:
        precision, weights = _precision(ctx)
        dtype = {"fp32": "fp32", "fp16": "fp16"}.get(precision, "bf16")
        if weights == "float32":
            dtype = "fp32"
        settings = dict(adapter=ctx.adapter, seq_len=recipe.train.max_length, batch_size=recipe.train.batch_size,
                        gradient_checkpointing=bool(recipe.train.gradient_checkpointing),  # "auto" counts as on
                        optimizer=recipe.train.optimizer, dtype=dtype, lora_r=recipe.adapter.r,
                        target_modules=recipe.adapter.target_modules, lora_dropout=recipe.adapter.dropout,
                        modules_to_save=list(recipe.adapter.modules_to_save), quant_bits=recipe.quant.bits)
        gpu = GpuSpec(ctx.device_info.get("name", "GPU"), float(ctx.device_info["memory_gib"]), bool(ctx.device_info.get("bf16")), 100.0)
        verdict = fit_verdict(ctx.model_config, gpu=gpu, **settings)
    except Exception:
        return
    if not verdict["fits"]:
        yield Finding("warning", "memory-does-not-fit",
                      f"estimated {verdict['needed_gib']:.1f} GiB needed, the GPU has {verdict['available_gib']:.1f} GiB",
                      "the run is likely to stop with CUDA out of memory at its first step",
                      "change one of: " + "; ".join(verdict["changes"]) + " (see `tuneforge plan`)",
                      ctx.where("train.batch_size"))
