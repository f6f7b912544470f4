"""The memory/time model: how much GPU memory and time a training run needs, for full fine-tuning, LoRA and QLoRA,
from a model config alone. `tuneforge plan` (guide/plan.py) shows it; speed (layout), guards (OOM advice),
distributed (strategy: auto) and the doctor decide with it. A recipe enters through one door, `recipe_settings`
(the plan_memory / fit_verdict keywords the recipe implies), or `plan_for_recipe` / `verdict_for_recipe`.

It sits at the bottom of the layers: it imports nothing from tuneforge but errors (no recipe, models, speed,
guards, distributed or guide), so anything may plan without an import loop. The model's shape and parameter count
live in memory_shapes.py; every name there is re-exported here.

Everything here is arithmetic on the config; no weights are read. The numbers are estimates of the peak of
`torch.cuda.max_memory_allocated()` for one training step with tuneforge's stack (transformers + TRL 1.16 SFT +
PEFT 0.21 + bitsandbytes), and `bench/plan_vs_measured.py` checks them against real peaks on a GPU.

Memory model (bytes; `c` = bytes per element of the compute dtype: 2 for bf16/fp16, 4 for fp32)
------------------------------------------------------------------------------------------------
peak = weights + gradients + optimizer states + max(activations + LM-head loss buffers, optimizer-step temporaries)

weights      full / LoRA: every parameter at `c` bytes.
             QLoRA: the linear layers of the transformer blocks in NF4: 0.5 byte per weight plus one fp32 absmax per
             block of 64 (0.0625 B), or with double quantization an int8 absmax per 64 plus one fp32 per 256 blocks
             (0.5 + 1/64 + 4/16384 = 0.5159 B). Embeddings, norms and the LM head are not quantized, and PEFT's
             `prepare_model_for_kbit_training` casts them to fp32 (4 B each). 8-bit base: 1 B per linear weight.
trainable    full: every parameter. LoRA/QLoRA: r * (in + out) for each adapted linear layer of each block, plus a
             trainable copy of each `modules_to_save` module. LoRA weights are fp32 on a bf16 base (PEFT's
             autocast_adapter_dtype) and bf16 under QLoRA (TRL casts them, following the QLoRA paper).
gradients    one per trainable parameter, in the parameter's dtype.
optimizer    per trainable parameter: AdamW (torch) 2 states in the parameter's dtype; 8-bit AdamW (bitsandbytes,
             paged or not) 2 bytes + block constants (2.03 B); 32-bit paged AdamW 8 B; Adafactor ~0 (factored);
             SGD 0; Lion 1 state. Paged optimizers hold the same bytes on the GPU but can spill to CPU under
             pressure, which is why QLoRA uses them.
step temp    torch's foreach AdamW allocates one state-sized temporary (sqrt of the second moment) at the step.
activations  per token, per decoder layer, for a Llama-style block under SDPA/flash attention:
               2 RMSNorms:   2 * (4 + 2c) * h        (fp32 upcast of the input, normalised and scaled outputs)
               attention:    c * (3 * q + 2 * q)     (q, k, v after RoPE -- k/v repeated to all query heads when a
                                                       mask forces the non-GQA path --, the kernel output, and the
                                                       re-laid-out input of o_proj); q = heads * head_dim
               gated MLP:    4 * c * i               (gate out, SiLU out, up out, their product)
             With a frozen base (LoRA/QLoRA) a frozen linear does not save its input and a frozen norm keeps only
             its fp32 input: norms 2 * 4 * h, attention c * 4q, MLP 3 * c * i; each adapted module then adds its
             own copy of its input as the adapter saw it (c * in), the dropout mask (1 byte * in when dropout > 0)
             and the rank-r intermediate (c * r). QLoRA: the MLP intermediates are fp32 (3 * 4 * i), since
             prepare_model_for_kbit_training leaves an fp32 residual stream and Linear4bit returns its input's
             dtype. (Checked on CPU by counting autograd's saved tensors in
             tests/test_plan.py; dropout masks are 1 byte on CUDA.)
             Without gradient checkpointing all L layers are held: tokens * L * per_layer.
             With it, only each layer's input (c * h per token per layer) plus one layer being recomputed.
LM head      TRL 1.16's SFT loss is a fused, tiled LM head that never builds the (tokens x vocab) logits: a
             4096 x 32768 tile, the gathered hidden states (c * h per token) and their fp32 gradient (4 * h per
             token), plus an fp32 gradient of the head weight (4 * V * h) when the head trains (full FT).
             Without the fused head (`fused_lm_head=False`, e.g. a plain HF loss): (c + 12) * V bytes per token
             (logits, fp32 copy, log-softmax, its gradient).
reserved     what nvidia-smi shows is more than the allocated peak: the CUDA context and cuBLAS workspace
             (~1 GiB) and allocator fragmentation (~8 %). The fit verdict compares that with the GPU's memory.

Time model: training FLOPs per token = 3x the forward for full FT (forward + backward for inputs and weights),
2x for LoRA/QLoRA (no weight gradients for the frozen base), +1x forward with gradient checkpointing; the forward
is 2 FLOPs per matmul weight plus 2 * L * q * seq_len for causal attention. Time = tokens * FLOPs / (peak bf16
TFLOP/s * utilisation), with an assumed utilisation of 40 % (full, LoRA) and 25 % (QLoRA: dequantisation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuneforge.memory_shapes import (  # noqa: F401 -- re-exported: the model's shape is part of the model
    LLAMA_LIKE,
    REFERENCE_CONFIGS,
    LinearSpec,
    ModelShape,
    _first,
    _is_moe,
    _matches,
    _text_config,
    count_parameters,
    is_reference_name,
    llama_shape,
    load_model_config,
    lora_parameters,
    meta_model,
    meta_shape,
    model_shape,
    nearest_reference,
    quiet_transformers,
    recipe_model_config,
    reference_config,
)

GIB = 2**30
# The optimizer by adapter type (seed 000 step 5: QLoRA pages optimizer state to CPU under pressure; plain AdamW
# otherwise): the recipe's default (recipe.py imports it from here) and what a plan assumes when none is given (an
# adapter the recipe does not use, e.g. a fit_verdict trial or a `tuneforge plan` row).
DEFAULT_OPTIMIZER = {"lora": "adamw_torch", "qlora": "paged_adamw_8bit", "full": "adamw_torch", "none": "adamw_torch"}
# The other adapter types (adapter_kinds.py): plain AdamW, and GaLore's own optimizer (projected states).
DEFAULT_OPTIMIZER.update({t: "adamw_torch" for t in ("adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning",
                                                     "bottleneck", "lisa", "spectrum", "freeze")})
DEFAULT_OPTIMIZER["galore"] = "galore_adamw"


# ---------------------------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # total memory as the driver reports it (nvidia-smi), in GiB
    bf16: bool
    tflops: float  # dense bf16 tensor-core TFLOP/s (fp16 where the GPU has no bf16)
    aliases: tuple[str, ...] = ()


GPUS: list[GpuSpec] = [
    GpuSpec("T4 16GB", 15.0, False, 65, ("t4",)),
    GpuSpec("L4 24GB", 22.5, True, 121, ("l4",)),
    GpuSpec("A10 24GB", 22.5, True, 125, ("a10", "a10g")),
    GpuSpec("RTX 4090 24GB", 24.0, True, 165, ("4090", "rtx4090", "rtx-4090")),
    GpuSpec("A100 40GB", 40.0, True, 312, ("a100-40", "a100-40gb", "a10040")),
    GpuSpec("A100 80GB", 80.0, True, 312, ("a100", "a100-80", "a100-80gb", "a10080")),
    GpuSpec("H100 80GB", 79.6, True, 989, ("h100", "h100-80", "h100-80gb", "h10080")),
    GpuSpec("H200 141GB", 140.4, True, 989, ("h200", "h200-141", "h200-141gb")),
]

CONTEXT_GIB = 1.0  # CUDA context + cuBLAS workspace, outside torch's allocator
FRAGMENTATION = 0.08  # reserved / allocated, a typical steady-state ratio for training
UTILISATION = {"full": 0.40, "lora": 0.40, "qlora": 0.25}


def _norm_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def find_gpu(name: str) -> GpuSpec:
    """A GPU from the table by a loose name: 'H100', 'h100-80gb', 'A100 40GB', 'rtx 4090', 'T4'."""
    from tuneforge.errors import TuneforgeError

    key = _norm_name(name)
    for gpu in GPUS:
        if key == _norm_name(gpu.name) or key in {_norm_name(a) for a in gpu.aliases}:
            return gpu
    # "A100" alone means the 80 GB part; anything starting with a known alias also matches
    for gpu in sorted(GPUS, key=lambda g: -len(max(g.aliases, key=len))):
        if any(key.startswith(_norm_name(a)) for a in gpu.aliases):
            return gpu
    raise TuneforgeError(f"unknown GPU {name!r}", where="--gpu",
                         fix=f"use one of {', '.join(g.name for g in GPUS)}, or give --vram GB")


def custom_gpu(vram_gb: float, *, bf16: bool = True, tflops: float = 100.0) -> GpuSpec:
    return GpuSpec(f"{vram_gb:g} GB GPU", float(vram_gb), bf16, tflops)


# ---------------------------------------------------------------------------------------------------------------
# Memory


DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}


def optimizer_bytes(optimizer: str | None, param_bytes: int) -> float:
    """Optimizer state bytes per trainable parameter (see the module docstring)."""
    name = (optimizer or "adamw_torch").lower()
    if "8bit" in name or "bnb_8bit" in name:
        return 1.0 if "lion" in name else 2.03
    if "lion" in name:
        return 4.0 if "32bit" in name else float(param_bytes)
    if "32bit" in name or name == "paged_adamw":
        return 8.0
    if "adafactor" in name:
        return 0.05
    if name in ("sgd",):
        return 0.0
    if "adam" in name:
        return 2.0 * param_bytes
    return 8.0  # unknown: assume fp32 Adam states (conservative)


def optimizer_step_temp_bytes(optimizer: str | None, param_bytes: int) -> float:
    name = (optimizer or "adamw_torch").lower()
    if name in ("adamw_torch", "adamw_hf", "adamw", "adamw_torch_xla"):
        return float(param_bytes)  # foreach AdamW: one state-sized temporary
    return 0.0


def quant_bytes_per_weight(bits: int, double_quant: bool) -> float:
    if bits == 8:
        return 1.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def layer_activation_bytes(shape: ModelShape, c: int, *, frozen_base: bool = False, mlp_bytes: int | None = None) -> float:
    """Saved activations per token for one decoder layer (module docstring), without any LoRA branch.

    With a frozen base (LoRA/QLoRA) autograd keeps less: a frozen linear needs only its weight to pass the
    gradient on, so its input is not saved, and a frozen RMSNorm keeps only its fp32 input. What the adapters
    save is added by `lora_activation_bytes`. `mlp_bytes` = 4 for QLoRA: `prepare_model_for_kbit_training` makes
    the embeddings and norms fp32, so the residual stream is fp32, and bitsandbytes' Linear4bit returns its
    input's dtype, so the MLP intermediates are fp32."""
    h, q, i = shape.hidden, shape.q_dim, shape.intermediate
    mlp_factor = shape.active_mlp_factor
    if frozen_base:
        norms = 2 * 4 * h
        attention = c * (2 * q + 2 * q)  # q, k, v (k/v repeated to all heads), kernel output
        mlp = 3 * (mlp_bytes or c) * i * mlp_factor  # gate out, up out, SiLU out
    else:
        norms = 2 * (4 + 2 * c) * h
        attention = c * (3 * q + 2 * q)  # ... and o_proj's input
        mlp = 4 * c * i * mlp_factor  # ... and down_proj's input
    return norms + attention + mlp


def lora_activation_bytes(shape: ModelShape, c: int, r: int, target_modules, dropout: float,
                          dropout_saves: str = "copy") -> float:
    """Per token per layer: each adapted module keeps its own copy of its input as the adapter saw it (PEFT casts
    the input to the adapter's dtype, autocast casts it back: c bytes per input feature), the dropout mask (1 byte
    per feature when dropout > 0) and the rank-r intermediate (c * r). dropout_saves (speed/lora_dropout.py, with
    dropout > 0): "mask" keeps only the mask, a bit per feature (a byte where the feature count is not divisible
    by 8; speed.keep_lora_dropout_mask), "none" nothing (speed.recompute_lora_dropout)."""
    per = 0.0
    lean = dropout > 0 and dropout_saves in ("mask", "none")
    for lin in shape.linears:
        if _matches(lin.name, target_modules):
            mask = 1 / 8 if lin.in_features % 8 == 0 else 1
            kept = (mask if dropout_saves == "mask" else 0) if lean else c + (1 if dropout > 0 else 0)
            per += lin.in_features * kept + c * r
    return per


def plan_memory(
    config,
    *,
    adapter: str = "lora",
    seq_len: int = 2048,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
    optimizer: str | None = None,
    dtype: str = "bf16",
    lora_r: int = 16,
    target_modules="all-linear",
    lora_dropout: float = 0.05,
    lora_dropout_saves: str = "copy",
    modules_to_save: list[str] | tuple = (),
    quant_bits: int = 4,
    double_quant: bool = True,
    fused_lm_head: bool = True,
    adapter_options: dict | None = None,
    quantize_base: bool = False,
) -> dict[str, Any]:
    """Peak training memory for one micro-batch of `batch_size` x `seq_len` tokens, broken down by part.

    `adapter`: full | none | lora | qlora. `dtype`: bf16 | fp16 | fp32 (weights and compute). `lora_dropout_saves`:
    copy | mask | none (lora_activation_bytes). `optimizer`: a
    transformers optimizer name (default by adapter type: DEFAULT_OPTIMIZER). Returns bytes for each part, the
    predicted `max_memory_allocated` (`total`), what the GPU will show (`reserved`), and both in GiB.
    """
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    adapter = "full" if adapter == "none" else adapter
    if adapter == "lora" and quantize_base:
        adapter = "qlora"
    if adapter not in ("full", "lora", "qlora"):
        if adapter not in DEFAULT_OPTIMIZER:
            raise ValueError(f"adapter must be one of {', '.join(DEFAULT_OPTIMIZER)} (got {adapter!r})")
        from tuneforge.memory_adapters import plan_other  # the other types (adapter_kinds.py), same parts

        parts = plan_other(shape, adapter, seq_len=seq_len, batch_size=batch_size,
                           gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, dtype=dtype,
                           options=adapter_options, quant_bits=quant_bits, double_quant=double_quant,
                           fused_lm_head=fused_lm_head, quantized=quantize_base)
        return _totals(parts, shape, adapter=adapter, dtype=dtype, seq_len=seq_len, batch_size=batch_size,
                       gradient_checkpointing=gradient_checkpointing)
    optimizer = optimizer or DEFAULT_OPTIMIZER[adapter]
    c = DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    lora = adapter in ("lora", "qlora")

    # weights
    if adapter == "qlora":
        weights = shape.params_linear * quant_bytes_per_weight(quant_bits, double_quant) + \
            (shape.params_total - shape.params_linear) * 4
    else:
        weights = shape.params_total * c

    # trainable parameters, gradients, optimizer
    save_params = 0
    for module in modules_to_save or ():
        if module in ("embed_tokens", "wte", "word_embeddings", "embeddings", "embed_in"):
            save_params += shape.params_embed
        elif module in ("lm_head", "embed_out", "output"):
            save_params += shape.params_head or shape.params_embed
    if lora:
        lora_params = lora_parameters(shape, lora_r, target_modules)
        param_bytes = 2 if adapter == "qlora" and c == 2 else 4
        trainable = lora_params + save_params
        weights += lora_params * param_bytes + save_params * (2 if adapter == "qlora" else c)
        trainable_bytes = lora_params * param_bytes + save_params * (2 if adapter == "qlora" else c)
    else:
        param_bytes = c
        trainable = shape.params_total
        trainable_bytes = trainable * c
    gradients = trainable_bytes
    per_param_state = optimizer_bytes(optimizer, param_bytes)
    optimizer_states = trainable * per_param_state
    step_temp = trainable * optimizer_step_temp_bytes(optimizer, param_bytes)

    # activations
    per_layer = layer_activation_bytes(shape, c, frozen_base=lora, mlp_bytes=4 if adapter == "qlora" else None)
    if lora:
        per_layer += lora_activation_bytes(shape, c, lora_r, target_modules, lora_dropout, lora_dropout_saves)
    final_norm = (4 + (0 if lora else 2 * c)) * shape.hidden
    if gradient_checkpointing:
        activations = tokens * (shape.layers * c * shape.hidden + per_layer + final_norm)
    else:
        activations = tokens * (shape.layers * per_layer + final_norm)

    # LM head / loss
    head_trainable = adapter == "full" or any(m in ("lm_head", "embed_out", "output") for m in modules_to_save or ())
    if fused_lm_head:
        tile = min(tokens, 4096) * min(shape.vocab, 32768) * c
        lm_head = tile + tokens * shape.hidden * (c + 4) + (4 * shape.vocab * shape.hidden if head_trainable else 0)
    else:
        lm_head = tokens * shape.vocab * (c + 12)

    parts = {"weights": weights, "gradients": gradients, "optimizer_states": optimizer_states,
             "optimizer_step_temp": step_temp, "activations": activations, "lm_head": lm_head,
             "params_trainable": trainable, "optimizer": optimizer}
    return _totals(parts, shape, adapter=adapter, dtype=dtype, seq_len=seq_len, batch_size=batch_size,
                   gradient_checkpointing=gradient_checkpointing)


def _totals(parts: dict, shape: ModelShape, **settings) -> dict[str, Any]:
    """The plan's parts with the peak (allocated) and what the GPU shows (reserved)."""
    total = parts["weights"] + parts["gradients"] + parts["optimizer_states"] + max(
        parts["activations"] + parts["lm_head"], parts["optimizer_step_temp"])
    reserved = total * (1 + FRAGMENTATION) + CONTEXT_GIB * GIB
    return {
        "adapter": settings["adapter"],
        "optimizer": parts["optimizer"],
        "dtype": settings["dtype"],
        "seq_len": settings["seq_len"],
        "batch_size": settings["batch_size"],
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "params_total": shape.params_total,
        "params_trainable": parts["params_trainable"],
        "weights": parts["weights"],
        "gradients": parts["gradients"],
        "optimizer_states": parts["optimizer_states"],
        "optimizer_step_temp": parts["optimizer_step_temp"],
        "activations": parts["activations"],
        "lm_head": parts["lm_head"],
        "total": total,
        "reserved": reserved,
        "total_gib": total / GIB,
        "reserved_gib": reserved / GIB,
    }


def largest_batch(config, *, vram_gib: float, max_batch: int = 1024, **settings) -> int:
    """The largest micro-batch whose estimated reserved memory fits in `vram_gib` (0 if not even 1 fits).
    Memory is affine in the batch size, so two estimates give the answer; the result is checked once more."""
    settings.pop("batch_size", None)
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    one = plan_memory(shape, batch_size=1, **settings)["reserved_gib"]
    if one > vram_gib:
        return 0
    two = plan_memory(shape, batch_size=2, **settings)["reserved_gib"]
    slope = max(two - one, 1e-9)
    batch = min(max_batch, 1 + int((vram_gib - one) / slope))
    while batch > 1 and plan_memory(shape, batch_size=batch, **settings)["reserved_gib"] > vram_gib:
        batch -= 1
    return batch


def fits(config, *, vram_gib: float, **settings) -> bool:
    return plan_memory(config, **settings)["reserved_gib"] <= vram_gib


# ---------------------------------------------------------------------------------------------------------------
# Time


def flops_per_token(config, *, adapter: str = "lora", seq_len: int = 2048, gradient_checkpointing: bool = False) -> float:
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    forward = 2 * shape.params_matmul + 2 * shape.layers * shape.q_dim * seq_len
    passes = 3.0 if adapter in ("full", "none", "galore", "lisa", "spectrum", "freeze") else 2.0
    if gradient_checkpointing:
        passes += 1.0
    return passes * forward


def estimate_seconds(config, *, tokens: float, gpu: GpuSpec, adapter: str = "lora", seq_len: int = 2048,
                     gradient_checkpointing: bool = False) -> float:
    """Wall-clock estimate for training on `tokens` tokens (module docstring: assumed utilisation)."""
    adapter = "full" if adapter == "none" else adapter
    rate = gpu.tflops * 1e12 * UTILISATION.get(adapter, UTILISATION["lora"])
    return tokens * flops_per_token(config, adapter=adapter, seq_len=seq_len,
                                    gradient_checkpointing=gradient_checkpointing) / rate


# ---------------------------------------------------------------------------------------------------------------
# Verdict: fits or not, and what to change


def fit_verdict(config, *, gpu: GpuSpec, **settings) -> dict[str, Any]:
    """Fits / does not fit on `gpu` with `settings` (plan_memory's keywords), the largest batch, and if it does not
    fit, the changes that make it fit, each checked with the estimate, cheapest first."""
    shape = config if isinstance(config, ModelShape) else model_shape(config)
    estimate = plan_memory(shape, **settings)
    ok = estimate["reserved_gib"] <= gpu.memory_gib
    result = {"fits": ok, "needed_gib": estimate["reserved_gib"], "available_gib": gpu.memory_gib,
              "largest_batch": largest_batch(shape, vram_gib=gpu.memory_gib, **settings), "changes": []}
    if ok:
        return result
    batch = settings.get("batch_size", 1)
    trials: list[tuple[str, dict]] = []
    if batch > 1:
        trials.append(("batch_size 1 (raise grad_accum to keep the effective batch)", {"batch_size": 1}))
    if not settings.get("gradient_checkpointing"):
        trials.append(("gradient_checkpointing: true (~30% slower)", {"gradient_checkpointing": True}))
        trials.append(("gradient_checkpointing: true and batch_size 1", {"gradient_checkpointing": True, "batch_size": 1}))
    adapter = "full" if settings.get("adapter", "lora") == "none" else settings.get("adapter", "lora")
    if adapter == "full" and "8bit" not in (settings.get("optimizer") or ""):
        trials.append(("optimizer: paged_adamw_8bit", {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True}))
    seq = settings.get("seq_len", 2048)
    if seq > 512:
        trials.append((f"max_length {seq // 2} (with gradient checkpointing)", {"seq_len": seq // 2, "gradient_checkpointing": True, "batch_size": 1}))
    if adapter == "full":
        trials.append(("adapter: lora", {"adapter": "lora", "optimizer": None, "gradient_checkpointing": True, "batch_size": 1}))
    if adapter in ("full", "lora"):
        trials.append(("adapter: qlora (4-bit base)", {"adapter": "qlora", "optimizer": None, "gradient_checkpointing": True, "batch_size": 1}))
    for label, change in trials:
        trial = {**settings, **change}
        needed = plan_memory(shape, **trial)["reserved_gib"]
        if needed <= gpu.memory_gib:
            result["changes"].append(f"{label}: ~{needed:.1f} GiB")
    bigger = [g for g in GPUS if g.memory_gib > gpu.memory_gib and g.memory_gib >= estimate["reserved_gib"]]
    if bigger:
        result["changes"].append(f"a larger GPU: {min(bigger, key=lambda g: g.memory_gib).name}")
    if not result["changes"]:
        result["changes"].append("a smaller model, or several GPUs (not planned here)")
    return result


def default_gpu() -> GpuSpec:
    """The local GPU when there is one (name matched to the table, memory as reported), else an H100."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            memory = props.total_memory / GIB
            try:
                known = find_gpu(props.name.replace("NVIDIA", "").strip())
                return GpuSpec(known.name, memory, known.bf16, known.tflops)
            except Exception:
                return GpuSpec(props.name, memory, torch.cuda.is_bf16_supported(), 100.0)
    except ImportError:  # pragma: no cover
        pass
    return find_gpu("H100")



# ---------------------------------------------------------------------------------------------------------------
# From a recipe: the one translation of a recipe into the plan's keywords (speed, guards, distributed and
# `tuneforge plan` all go through it, so a recipe key the plan learns to read reaches every caller at once)


def recipe_dtype(recipe, gpu: GpuSpec) -> str:
    """The compute dtype a recipe trains in on `gpu`: train.precision, else model.dtype, else bf16 where the GPU
    has it and fp32 where it does not (as models.resolve_dtype decides `auto`)."""
    precision = recipe.train.precision
    if precision == "auto":
        precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(recipe.model.dtype, "auto")
    if precision == "auto":
        return "bf16" if gpu.bf16 else "fp32"
    return precision


def recipe_settings(recipe, *, gpu: GpuSpec | None = None, **changes) -> dict[str, Any]:
    """The plan_memory / fit_verdict keywords a recipe implies: adapter, micro-batch (batch_size x max_length),
    gradient checkpointing, optimizer (the recipe's, always resolved), dtype, LoRA rank / targets / dropout /
    modules_to_save, and the QLoRA quantization. `gpu` decides the dtype under precision auto (default_gpu() when
    not given). `changes` replace any of them, e.g. the largest micro-batch the data can make (speed)."""
    t, a, q = recipe.train, recipe.adapter, recipe.quant
    settings = dict(
        adapter="full" if a.type == "none" else a.type, seq_len=t.max_length, batch_size=t.batch_size,
        gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer,
        # only looked up when not given: default_gpu() asks CUDA for the local GPU
        dtype=None if "dtype" in changes else recipe_dtype(recipe, gpu or default_gpu()),
        lora_r=a.r, target_modules=a.target_modules, lora_dropout=a.dropout, modules_to_save=list(a.modules_to_save),
        quant_bits=q.bits, double_quant=q.double_quant,
    )
    s = recipe.speed
    if a.type == "lora" and s.fused_lora is not False and (s.keep_lora_dropout_mask or s.recompute_lora_dropout):
        settings["lora_dropout_saves"] = "none" if s.recompute_lora_dropout else "mask"
    if a.type not in ("lora", "qlora", "full", "none"):  # the other types' knobs (memory_adapters.py)
        from tuneforge.memory_adapters import adapter_options

        settings.update(adapter_options=adapter_options(a), quantize_base=a.quantize_base)
    settings.update(changes)
    return settings


def plan_for_recipe(recipe, model_config, *, gpu: GpuSpec | None = None, **changes) -> dict[str, Any]:
    """plan_memory for a recipe (recipe_settings with `changes`) on a model config or ModelShape."""
    return plan_memory(model_config, **recipe_settings(recipe, gpu=gpu, **changes))


def verdict_for_recipe(recipe, model_config, *, gpu: GpuSpec, **changes) -> dict[str, Any]:
    """fit_verdict for a recipe (recipe_settings with `changes`) on `gpu`."""
    return fit_verdict(model_config, gpu=gpu, **recipe_settings(recipe, gpu=gpu, **changes))
