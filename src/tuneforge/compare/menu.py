"""The methods `tuneforge compare` knows: each name is an adapter: section over the recipe (adapter_kinds.py lists
the types; LoRA's variants are LoRA with one switch)."""

from __future__ import annotations

from tuneforge.adapter_kinds import ADAPTER_TYPES

VARIANTS = {
    "dora": {"type": "lora", "use_dora": True},
    "rslora": {"type": "lora", "use_rslora": True},
    "pissa": {"type": "lora", "init": "pissa"},
    "olora": {"type": "lora", "init": "olora"},
    "ptuning_v2": {"type": "prefix_tuning", "prefix_projection": True},  # P-tuning v2: deep prompts, reparameterised
}
EVERY = ("lora", "qlora", "dora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "ptuning_v2", "p_tuning",
         "bottleneck", "galore", "lisa", "spectrum", "freeze", "full")


def method_names() -> list[str]:
    return [t for t in ADAPTER_TYPES if t != "none"] + list(VARIANTS)


def adapter_for(method: str) -> dict:
    """The adapter: section of one compared method (its defaults; nothing carried over from the recipe's own)."""
    if method in VARIANTS:
        return dict(VARIANTS[method])
    if method in ADAPTER_TYPES and method != "none":
        return {"type": method}
    raise KeyError(method)


def parse_methods(text: str) -> list[str]:
    from tuneforge.errors import TuneforgeError

    names = list(EVERY) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in method_names()]
    if unknown or not names:
        raise TuneforgeError(f"unknown method(s) {unknown}" if unknown else "no methods given", where="--methods",
                             fix=f"use some of {', '.join(method_names())}, or all")
    if len(set(names)) != len(names):
        raise TuneforgeError("a method is listed twice", where="--methods", fix="list each once")
    return names
