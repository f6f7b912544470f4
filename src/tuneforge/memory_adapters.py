"""The memory model of the adapter types beyond full / LoRA / QLoRA (adapter_kinds.py), on the same terms as
memory.plan_memory (whose module docstring defines weights, gradients, optimizer states, activations and the LM head):

frozen-base types (the base's weights need no gradient or optimizer state; activations as LoRA's frozen base)
  adalora        LoRA's count at r = init_r, plus the init_r singular values per layer (lora_E); its activations as
                 LoRA's at r = init_r.
  ia3            one scaling vector per adapted module: the output width of k/v (attention targets), the input width
                 of the feed-forward ones (down_proj); each keeps its scaled tensor (c bytes per element).
  prompt_tuning  num_virtual_tokens x hidden; every row is longer by the virtual tokens (activations scale with it).
  p_tuning       as prompt tuning, plus the prompt encoder (MLP: hidden->enc, enc->enc, enc->hidden).
  prefix_tuning  num_virtual_tokens x 2 x layers x kv width (the past keys/values); with prefix_projection the
                 embedding (n x kv width) and a 2-layer MLP (kv width->enc->2 x layers x kv width) instead.
  bottleneck     per layer down (hidden x m + m) and up (m x hidden + hidden), m = hidden / reduction; each keeps
                 its input and the ReLU output.
full-parameter savers (the base's weights train; bf16/fp32 as full fine-tuning)
  galore         every weight has a gradient; the targeted 2-D weights keep AdamW's two states in the rank-r
                 projection (r x the larger side) plus the projection matrix (r x the smaller side); the rest keep
                 full states.
  lisa           gradients and optimizer states only for the active layers, the embeddings and the head (states of
                 layers that go inactive are dropped, full_savers.lisa_callback); activations: active layers as full
                 fine-tuning, the others as a frozen base (gradients still flow through them to the embeddings).
  spectrum       the chosen share of each kind of linear trains (gradients, states, and its saved input).
  freeze         the chosen layers train in full; layers below the lowest trainable one keep no activations (no
                 gradient has to reach them).
Activation checkpointing keeps one layer input per layer, as in plan_memory.
"""

from __future__ import annotations

import math

from tuneforge.memory_shapes import ModelShape, _matches


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "out_proj")


def _path(name: str) -> str:
    """A block linear's path as module patterns see it (the shape keeps short names): self_attn.q_proj, mlp.up_proj."""
    return name if "." in name else (f"self_attn.{name}" if name in _ATTENTION else f"mlp.{name}")


def _kv(shape: ModelShape) -> int:
    return shape.kv_heads * shape.head_dim


def _layer_params(shape: ModelShape) -> int:
    return sum(lin.params for lin in shape.linears) + shape.params_blocks_other + 2 * shape.hidden


def _freeze_layers(options: dict, layers: int) -> set[int]:
    wanted = options.get("trainable_layers", 2)
    if isinstance(wanted, int):
        return set(range(max(0, layers - wanted), layers))
    return {i % layers for i in wanted if -layers <= i < layers}


def _ia3_targets(options: dict) -> tuple[list[str], list[str]]:
    targets = options.get("target_modules", "all-linear")
    targets = ["k_proj", "v_proj", "down_proj"] if targets == "all-linear" else targets
    feedforward = options.get("feedforward_modules") or ["down_proj"]
    return targets, feedforward


def adapter_params(shape: ModelShape, adapter: str, options: dict) -> int:
    """Trainable parameters of a frozen-base adapter type."""
    h, L = shape.hidden, shape.layers
    n = options.get("num_virtual_tokens", 20)
    enc = options.get("encoder_hidden_size") or h
    if adapter == "adalora":
        r = options.get("init_r", 12)
        targets = options.get("target_modules", "all-linear")
        return L * sum(r * (lin.in_features + lin.out_features) + r for lin in shape.linears
                       if _matches(lin.name, targets))
    if adapter == "ia3":
        targets, feedforward = _ia3_targets(options)
        return L * sum(lin.in_features if _matches(lin.name, feedforward) else lin.out_features
                       for lin in shape.linears if _matches(lin.name, targets))
    if adapter == "prompt_tuning":
        return n * h
    if adapter == "p_tuning":
        return n * h + (h * enc + enc) + (enc * enc + enc) + (enc * h + h)
    if adapter == "prefix_tuning":  # PEFT's prefix width is the key/value width (grouped-query attention)
        token, out = _kv(shape), 2 * L * _kv(shape)
        if options.get("prefix_projection"):
            return n * token + (token * enc + enc) + (enc * out + out)
        return n * out
    if adapter == "bottleneck":
        m = max(1, h // options.get("bottleneck_reduction", 16))
        return L * (h * m + m + m * h + h)
    raise ValueError(f"not a frozen-base adapter type: {adapter}")


def _adapter_activations(shape: ModelShape, adapter: str, options: dict, c: int) -> float:
    """Per token per layer, beyond the frozen base's own."""
    h = shape.hidden
    if adapter == "adalora":
        from tuneforge.memory import lora_activation_bytes

        return lora_activation_bytes(shape, c, options.get("init_r", 12), options.get("target_modules", "all-linear"),
                                     options.get("dropout", 0.05))
    if adapter == "ia3":
        targets, feedforward = _ia3_targets(options)
        return sum(c * (lin.in_features if _matches(lin.name, feedforward) else lin.out_features)
                   for lin in shape.linears if _matches(lin.name, targets))
    if adapter == "bottleneck":
        m = max(1, h // options.get("bottleneck_reduction", 16))
        return c * (h + 2 * m) + (1 if options.get("dropout", 0.05) > 0 else 0) * m
    return 0.0


def plan_other(shape: ModelShape, adapter: str, *, seq_len: int, batch_size: int, gradient_checkpointing: bool,
               optimizer: str | None, dtype: str, options: dict | None, quant_bits: int, double_quant: bool,
               fused_lm_head: bool, quantized: bool = False) -> dict:
    """plan_memory for the other adapter types: the same parts, the same keys."""
    from tuneforge.memory import (DEFAULT_OPTIMIZER, DTYPE_BYTES, layer_activation_bytes, optimizer_bytes,
                                  optimizer_step_temp_bytes, quant_bytes_per_weight)

    options = options or {}
    optimizer = optimizer or DEFAULT_OPTIMIZER.get(adapter, "adamw_torch")
    c = DTYPE_BYTES[dtype]
    L, h = shape.layers, shape.hidden
    frozen = adapter in ("adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck")
    extra_tokens = options.get("num_virtual_tokens", 20) if adapter in ("prompt_tuning", "p_tuning") else 0
    tokens = batch_size * (seq_len + extra_tokens)
    if quantized:
        weights = shape.params_linear * quant_bytes_per_weight(quant_bits, double_quant) + \
            (shape.params_total - shape.params_linear) * 4
    else:
        weights = shape.params_total * c
    galore_states = 0.0
    if frozen:
        trainable = adapter_params(shape, adapter, options)
        param_bytes = 4  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype); tuneforge's bottleneck in c
        param_bytes = c if adapter == "bottleneck" else param_bytes
        weights += trainable * param_bytes
        state_params = trainable
        base = layer_activation_bytes(shape, c, frozen_base=True, mlp_bytes=4 if quantized else None)
        per_layer_all = L * (base + _adapter_activations(shape, adapter, options, c))
    else:
        param_bytes = c
        full_layer = layer_activation_bytes(shape, c, frozen_base=False)
        frozen_layer = layer_activation_bytes(shape, c, frozen_base=True)
        outside = shape.params_embed + shape.params_head + max(0, shape.params_norm - 2 * L * h)  # + final norm
        if adapter == "galore":
            trainable, state_params = shape.params_total, 0
            rank = options.get("galore_rank", 128)
            patterns = options.get("galore_target_modules", ["attn", "mlp"])
            for lin in shape.linears:
                hit = any(p in _path(lin.name) for p in patterns)
                big, small = max(lin.in_features, lin.out_features), min(lin.in_features, lin.out_features)
                if hit and rank < small:
                    galore_states += L * (2 * rank * big + rank * small)
                else:
                    state_params += L * lin.params
            state_params += shape.params_total - shape.params_linear
            per_layer_all = L * full_layer
        elif adapter == "lisa":
            active = min(L, options.get("lisa_layers", 2))
            trainable = outside + active * _layer_params(shape)
            state_params = trainable
            per_layer_all = active * full_layer + (L - active) * frozen_layer
        elif adapter == "spectrum":
            share = options.get("spectrum_top_fraction", 0.25)
            kept = sum(math.ceil(share * L) * lin.params for lin in shape.linears)
            trainable = state_params = kept
            per_layer_all = L * frozen_layer + sum(math.ceil(share * L) * c * lin.in_features for lin in shape.linears)
        else:  # freeze
            chosen = _freeze_layers(options, L)
            modules = options.get("trainable_modules") or []
            per = sum(lin.params for lin in shape.linears if not modules or any(m in _path(lin.name) for m in modules))
            trainable = state_params = len(chosen) * (per + (0 if modules else 2 * h))
            lowest = min(chosen) if chosen else L
            per_layer_all = len(chosen) * full_layer + max(0, L - lowest - len(chosen)) * frozen_layer
    gradients = trainable * param_bytes
    optimizer_states = state_params * optimizer_bytes(optimizer, param_bytes) + galore_states * param_bytes
    step_temp = state_params * optimizer_step_temp_bytes(optimizer, param_bytes)
    final_norm = (4 + (0 if frozen else 2 * c)) * h
    if gradient_checkpointing:
        activations = tokens * (L * c * h + per_layer_all / max(1, L) + final_norm)
    else:
        activations = tokens * (per_layer_all + final_norm)
    if adapter == "prefix_tuning":  # the prefix's keys/values, per row, in every layer (not per token)
        activations += batch_size * options.get("num_virtual_tokens", 20) * 2 * L * _kv(shape) * c
    head_trainable = not frozen and adapter != "freeze"
    if fused_lm_head:
        tile = min(tokens, 4096) * min(shape.vocab, 32768) * c
        lm_head = tile + tokens * h * (c + 4) + (4 * shape.vocab * h if head_trainable else 0)
    else:
        lm_head = tokens * shape.vocab * (c + 12)
    return {"weights": weights, "gradients": gradients, "optimizer_states": optimizer_states,
            "optimizer_step_temp": step_temp, "activations": activations, "lm_head": lm_head,
            "params_trainable": trainable, "optimizer": optimizer}


def adapter_options(adapter) -> dict:
    """The knobs of a recipe's adapter section the memory model reads."""
    keys = ("init_r", "target_modules", "dropout", "feedforward_modules", "num_virtual_tokens", "encoder_hidden_size",
            "prefix_projection", "bottleneck_reduction", "galore_rank", "galore_target_modules", "lisa_layers",
            "spectrum_top_fraction", "trainable_layers", "trainable_modules")
    return {k: getattr(adapter, k) for k in keys if hasattr(adapter, k)}
