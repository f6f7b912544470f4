"""Training methods. A method module registers itself with one `@register("name")` line; adding a method is one
new file here plus a recipe and a test. Modules are imported only when their method is used."""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, object] = {}

# method name -> module that defines it (several names may share a module)
MODULES = {"sft": "sft", "cpt": "sft", "dpo": "preference", "kto": "preference", "orpo": "preference",
           "simpo": "preference", "cpo": "preference", "reward": "reward", "ppo": "ppo", "grpo": "online_rl",
           "rloo": "online_rl", "online_dpo": "online_rl", "gkd": "gkd"}


def register(name: str):
    def decorate(method):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = method
        return method

    return decorate


def get_method(name: str):
    if name not in _REGISTRY:
        importlib.import_module(f"tuneforge.methods.{MODULES.get(name, name)}")
    return _REGISTRY[name]
