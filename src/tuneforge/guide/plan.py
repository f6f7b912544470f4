"""`tuneforge plan`: how much GPU memory and time a run needs, for full fine-tuning, LoRA and QLoRA, from a model
config alone (hub id, local folder, the embedded model, a recipe, or a reference size such as `llama-8b`).

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

import math
import re
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30

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
# Model shape and parameter count


@dataclass
class LinearSpec:
    """One linear layer of a decoder block (repeated in every layer)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int | None
    linears: list[LinearSpec] = field(default_factory=list)  # per block
    params_embed: int = 0
    params_head: int = 0  # 0 when tied to the embeddings
    params_norm: int = 0
    params_blocks_other: int = 0  # per-block non-linear parameters other than norms (rare)
    active_mlp_factor: float = 1.0  # MoE: experts each token passes through (activations scale with it)
    source: str = "formula"  # "formula" or "meta" (counted on a meta-device model)
    notes: list[str] = field(default_factory=list)  # where the estimate is rougher than usual

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def params_linear(self) -> int:
        """Weights (and biases) of the blocks' linear layers: what QLoRA quantizes."""
        return self.layers * sum(lin.params for lin in self.linears)

    @property
    def params_total(self) -> int:
        return self.params_embed + self.params_linear + self.params_norm + self.params_head + self.layers * self.params_blocks_other

    @property
    def params_matmul(self) -> int:
        """Weights that take part in a matmul per token (the head always does, tied or not)."""
        return self.params_linear + self.vocab * self.hidden


# model types whose parameter count follows the Llama formula exactly (checked against a meta model in tests)
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


def _text_config(config):
    if isinstance(config, dict):
        from types import SimpleNamespace

        return SimpleNamespace(**config)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape(config) -> ModelShape:
    """The shape of a decoder from its config: by the Llama formula for Llama-like configs (documented in
    `llama_shape`), otherwise by counting a model built on the meta device (exact for any architecture)."""
    text = _text_config(config)
    if getattr(text, "model_type", None) in LLAMA_LIKE and not _is_moe(text):
        return llama_shape(text)
    return meta_shape(config)


def _is_moe(config) -> bool:
    return bool(_first(config, "num_local_experts", "num_experts", "n_routed_experts", default=0))


def llama_shape(config) -> ModelShape:
    """Parameter count of a Llama-style decoder (Llama, Mistral, Qwen2, Qwen3) from its config.

    h = hidden_size, L = num_hidden_layers, V = vocab_size, i = intermediate_size, hd = head_dim (default h / heads),
    q = num_attention_heads * hd, kv = num_key_value_heads * hd (grouped-query attention: kv < q).

        embeddings      V * h
        attention       q_proj h*q + k_proj h*kv + v_proj h*kv + o_proj q*h        per layer
                        (+ biases: q + 2kv (+ h for o_proj) when attention_bias; Qwen2 always has q/k/v biases)
        MLP (SwiGLU)    gate h*i + up h*i + down i*h                                 per layer (+ 2i + h if mlp_bias)
        norms           2h per layer (input + post-attention RMSNorm) + h final (+ 2*hd per layer for Qwen3's q/k norms)
        lm_head         V * h, or 0 when tie_word_embeddings (it reuses the embedding matrix)
        total           V*h + L*(attention + MLP + norms) + h + lm_head
    """
    h = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=h // heads))
    i = int(config.intermediate_size)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    model_type = getattr(config, "model_type", "llama")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False)) if model_type == "llama" else False
    linears = [
        LinearSpec("q_proj", h, q, qkv_bias),
        LinearSpec("k_proj", h, kv, qkv_bias),
        LinearSpec("v_proj", h, kv, qkv_bias),
        LinearSpec("o_proj", q, h, o_bias),
        LinearSpec("gate_proj", h, i, mlp_bias),
        LinearSpec("up_proj", h, i, mlp_bias),
        LinearSpec("down_proj", i, h, mlp_bias),
    ]
    norm_per_layer = 2 * h + (2 * head_dim if model_type == "qwen3" else 0)
    return ModelShape(
        model_type=model_type, hidden=h, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=i, vocab=vocab, tied=tied, max_positions=_first(config, "max_position_embeddings"),
        linears=linears, params_embed=vocab * h, params_head=0 if tied else vocab * h,
        params_norm=layers * norm_per_layer + h, source="formula",
    )


def meta_model(config):
    """The model built on the meta device: module names and parameter shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.models import quiet_transformers

    quiet_transformers()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=getattr(config, "_tuneforge_trust", False))


def meta_shape(config) -> ModelShape:
    """Shape of any causal LM, counted on a meta-device model: the linear layers of block 0 give the per-block
    linears, unique parameters give the total (tied weights counted once)."""
    import torch

    model = meta_model(config)
    text = _text_config(config)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    params_total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    per_block: dict[str, LinearSpec] = {}
    block_prefix = None
    linear_total = 0
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            weight = module.weight
            in_f, out_f = (weight.shape[1], weight.shape[0]) if isinstance(module, torch.nn.Linear) else weight.shape
            bias = getattr(module, "bias", None) is not None
            linear_total += weight.numel() + (module.bias.numel() if bias else 0)
            match = re.search(r"^(.*?\.)(\d+)\.(.*)$", name)
            if match and (block_prefix is None or match.group(1) + match.group(2) == block_prefix):
                block_prefix = match.group(1) + match.group(2)
                short = match.group(3)
                per_block[short] = LinearSpec(short.split(".")[-1] if short.count(".") == 1 else short, int(in_f), int(out_f), bias)
    h = int(_first(text, "hidden_size", "n_embd", "d_model", default=embed.weight.shape[1] if embed is not None else 0))
    layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers", default=1))
    heads = int(_first(text, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_first(text, "num_key_value_heads", default=heads))
    head_dim = int(_first(text, "head_dim", default=h // max(1, heads)))
    experts_per_token = _first(text, "num_experts_per_tok", "moe_topk", default=None)
    intermediate = int(_first(text, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
    vocab = int(_first(text, "vocab_size", default=embed.weight.shape[0] if embed is not None else 0))
    params_embed = embed.weight.numel() if embed is not None else 0
    params_head = 0 if tied or head is None else sum(p.numel() for p in head.parameters())
    # everything that is neither a linear, the embeddings nor the head: norms, routers' non-linear bits, positions
    rest = params_total - params_embed - params_head - linear_total
    linears = list(per_block.values())
    block_linear = sum(lin.params for lin in linears)
    # MoE: the per-block linears list every expert; scale the linear total so params_total stays exact
    shape = ModelShape(
        model_type=getattr(text, "model_type", "?"), hidden=h, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, tied=tied,
        max_positions=_first(text, "max_position_embeddings", "n_positions"), linears=linears,
        params_embed=params_embed, params_head=params_head, params_norm=rest, source="meta",
        active_mlp_factor=float(experts_per_token or 1),
    )
    if block_linear * layers != linear_total:
        # linears outside the repeated blocks (rare): keep the count exact
        shape.params_norm += linear_total - block_linear * layers
    if _is_moe(text):
        shape.notes.append("mixture-of-experts: the parameter count is exact, but expert weights stored as fused "
                           "tensors are counted as unquantized and activations assume top-k experts per token")
    elif shape.model_type not in LLAMA_LIKE:
        shape.notes.append(f"{shape.model_type}: parameters counted exactly; activations use the Llama-block formula "
                           "(an approximation for this architecture)")
    return shape


def count_parameters(config) -> dict[str, int]:
    """Parameter count by part (embeddings, blocks' linears, norms, lm_head, total)."""
    shape = model_shape(config)
    return {"embeddings": shape.params_embed, "linear": shape.params_linear, "norms_other": shape.params_norm,
            "lm_head": shape.params_head, "total": shape.params_total}


def _matches(name: str, targets) -> bool:
    short = name.split(".")[-1]
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None or re.fullmatch(targets, short) is not None
    return short in targets or name in targets


def lora_parameters(config_or_shape, r: int, target_modules="all-linear") -> int:
    """Trainable LoRA parameters: r * (in + out) for each adapted linear of each block (A is r x in, B is out x r)."""
    shape = config_or_shape if isinstance(config_or_shape, ModelShape) else model_shape(config_or_shape)
    return shape.layers * sum(r * (lin.in_features + lin.out_features) for lin in shape.linears
                              if _matches(lin.name, target_modules))


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


def lora_activation_bytes(shape: ModelShape, c: int, r: int, target_modules, dropout: float) -> float:
    """Per token per layer: each adapted module keeps its own copy of its input as the adapter saw it (PEFT casts
    the input to the adapter's dtype, autocast casts it back: c bytes per input feature), the dropout mask (1 byte
    per feature when dropout > 0) and the rank-r intermediate (c * r)."""
    per = 0.0
    for lin in shape.linears:
        if _matches(lin.name, target_modules):
            per += lin.in_features * (c + (1 if dropout > 0 else 0)) + c * r
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
    modules_to_save: list[str] | tuple = (),
    quant_bits: int = 4,
    double_quant: bool = True,
    fused_lm_head: bool = True,
) -> dict[str, Any]:
    """Peak training memory for one micro-batch of `batch_size` x `seq_len` tokens, broken down by part.

    `adapter`: full | none | lora | qlora. `dtype`: bf16 | fp16 | fp32 (weights and compute). `optimizer`: a
    transformers optimizer name (default by adapter type, as in recipe.py). Returns bytes for each part, the
    predicted `max_memory_allocated` (`total`), what the GPU will show (`reserved`), and both in GiB.
    """
    from tuneforge.recipe import DEFAULT_OPTIMIZER

    shape = config if isinstance(config, ModelShape) else model_shape(config)
    adapter = "full" if adapter == "none" else adapter
    if adapter not in ("full", "lora", "qlora"):
        raise ValueError(f"adapter must be full, lora or qlora (got {adapter!r})")
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
        per_layer += lora_activation_bytes(shape, c, lora_r, target_modules, lora_dropout)
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

    total = weights + gradients + optimizer_states + max(activations + lm_head, step_temp)
    reserved = total * (1 + FRAGMENTATION) + CONTEXT_GIB * GIB
    return {
        "adapter": adapter,
        "optimizer": optimizer,
        "dtype": dtype,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "gradient_checkpointing": gradient_checkpointing,
        "params_total": shape.params_total,
        "params_trainable": trainable,
        "weights": weights,
        "gradients": gradients,
        "optimizer_states": optimizer_states,
        "optimizer_step_temp": step_temp,
        "activations": activations,
        "lm_head": lm_head,
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
    passes = 3.0 if adapter in ("full", "none") else 2.0
    if gradient_checkpointing:
        passes += 1.0
    return passes * forward


def estimate_seconds(config, *, tokens: float, gpu: GpuSpec, adapter: str = "lora", seq_len: int = 2048,
                     gradient_checkpointing: bool = False) -> float:
    """Wall-clock estimate for training on `tokens` tokens (module docstring: assumed utilisation)."""
    adapter = "full" if adapter == "none" else adapter
    rate = gpu.tflops * 1e12 * UTILISATION[adapter]
    return tokens * flops_per_token(config, adapter=adapter, seq_len=seq_len,
                                    gradient_checkpointing=gradient_checkpointing) / rate


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


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


# ---------------------------------------------------------------------------------------------------------------
# Reference shapes (`tuneforge plan llama-8b`) and config loading

REFERENCE_CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072),
}


def reference_config(name: str):
    """A LlamaConfig of a reference size ('llama-8b', '8b', 'smollm2-135m')."""
    from transformers import LlamaConfig

    key = name.lower().removeprefix("reference:")
    if key not in REFERENCE_CONFIGS:
        key = f"llama-{key}"
    return LlamaConfig(**REFERENCE_CONFIGS[key])


def is_reference_name(name: str) -> bool:
    key = name.lower().removeprefix("reference:")
    return key in REFERENCE_CONFIGS or f"llama-{key}" in REFERENCE_CONFIGS


def nearest_reference(params: float) -> str:
    """The reference shape whose parameter count is nearest (in log scale) to `params`."""
    from types import SimpleNamespace

    def total(d):
        return llama_shape(SimpleNamespace(model_type="llama", **d)).params_total

    return min(REFERENCE_CONFIGS, key=lambda k: abs(math.log(total(REFERENCE_CONFIGS[k]) / params)))


def load_model_config(name: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config (config.json only, no weights): hub id, local folder, .gguf, embedded, or a reference
    size. Raises ModelError with a fix when it cannot be read."""
    from tuneforge.errors import ModelError

    if is_reference_name(name):
        return reference_config(name)
    from transformers import AutoConfig

    from tuneforge.models import quiet_transformers, resolve_model_source

    quiet_transformers()
    source = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the config of {name!r}: {str(exc).splitlines()[0][:200]}", where="model.name",
                         fix="give a local model folder, the embedded model, or a reference size like llama-8b") from None
    config._tuneforge_trust = trust_remote_code
    return config


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


def make_plan(source, *, gpu: str | GpuSpec | None = None, vram_gb: float | None = None, seq_len: int | None = None,
              batch_size: int | None = None, gradient_checkpointing: bool | None = None,
              tokens: float | None = None) -> Plan:
    """Plan a recipe (path or Recipe) or a model (hub id, folder, embedded, reference size) on a GPU.

    For a recipe, its settings (max_length, batch_size, gradient checkpointing, optimizer, LoRA rank/targets,
    quantization) are used and its adapter row is marked; the training tokens come from its data when the data
    can be read (else time is given per million tokens). `vram_gb` overrides the GPU's memory.
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

    if recipe is not None:
        name = recipe.model.name
        config = load_model_config(name, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
        t, a = recipe.train, recipe.adapter
        settings = dict(seq_len=seq_len or t.max_length, batch_size=batch_size or t.batch_size,
                        gradient_checkpointing=t.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing,
                        lora_r=a.r, target_modules=a.target_modules, lora_dropout=a.dropout,
                        modules_to_save=list(a.modules_to_save), quant_bits=recipe.quant.bits,
                        double_quant=recipe.quant.double_quant)
        dtype = _recipe_dtype(recipe, spec)
        recipe_adapter = "full" if a.type == "none" else a.type
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
    for adapter in ("full", "lora", "qlora"):
        row_settings = {k: v for k, v in settings.items() if k != "seq_len_warning"}
        row_settings.update(adapter=adapter, dtype=dtype)
        if recipe is not None and adapter == recipe_adapter:
            row_settings["optimizer"] = recipe.train.optimizer
        estimate = plan_memory(shape, **row_settings)
        verdict = fit_verdict(shape, gpu=spec, **row_settings)
        seconds = None
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


def _recipe_dtype(recipe, gpu: GpuSpec) -> str:
    precision = recipe.train.precision
    if precision == "auto":
        precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(recipe.model.dtype, "auto")
    if precision == "auto":
        return "bf16" if gpu.bf16 else "fp32"
    return precision


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
    console.print("[dim]estimates (see tuneforge/guide/plan.py for the formulas); time assumes "
                  f"{int(UTILISATION['lora'] * 100)}% ({int(UTILISATION['qlora'] * 100)}% QLoRA) of the GPU's bf16 peak[/]")
