"""The shape of a decoder from its config alone -- hidden size, layers, heads, the linear layers of a block --, its
parameter count (by the Llama formula, or counted on a meta-device model for any other architecture), the
reference shapes (`llama-8b`, ...) and reading a model's config. No weights are read.

Part of the memory/time model (tuneforge/memory.py, which re-exports every name here). Like memory.py it sits at
the bottom of the layers: it imports nothing from tuneforge but errors, so speed, guards and distributed can plan
without pulling in recipes, models or the `tuneforge plan` command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


def quiet_transformers() -> None:
    """No per-tensor progress bars and errors only from transformers' loaders, as models.quiet_transformers does
    (same three calls: this module sits below models.py and must not import it)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()


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


def load_model_config(name: str, *, trust_remote_code: bool = False, revision: str | None = None,
                      resolve_source=None):
    """The model's config (config.json only, no weights): hub id, local folder, or a reference size. Raises
    ModelError with a fix when it cannot be read.

    `resolve_source(name)` turns tuneforge's own model names (the embedded model, a .gguf file) into a folder
    `from_pretrained` reads: callers pass models.resolve_model_source (this module must not import models.py);
    without it the name goes to transformers as it is."""
    from tuneforge.errors import ModelError

    if is_reference_name(name):
        return reference_config(name)
    from transformers import AutoConfig

    quiet_transformers()
    source = resolve_source(name) if resolve_source is not None else name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the config of {name!r}: {str(exc).splitlines()[0][:200]}", where="model.name",
                         fix="give a local model folder, the embedded model, or a reference size like llama-8b") from None
    config._tuneforge_trust = trust_remote_code
    return config


def recipe_model_config(recipe, *, resolve_source=None):
    """load_model_config for a recipe's `model:` section (name, trust_remote_code, revision)."""
    m = recipe.model
    return load_model_config(m.name, trust_remote_code=m.trust_remote_code, revision=m.revision,
                             resolve_source=resolve_source)
