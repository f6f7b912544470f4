"""Bottleneck adapters (Houlsby et al. 2019; the Pfeiffer placement: one adapter after each block's feed-forward),
tuneforge's own, in this one file.

Why not a library: AdapterHub's `adapters` (the maintained bottleneck-adapter library) pins `transformers~=4.57.6`
(adapters 1.3.0, checked 2026-12-07 from its wheel's Requires-Dist) and patches transformers' model classes, so it
does not install beside tuneforge's transformers 5.x; PEFT has no bottleneck adapter. What is here is the whole
method, small enough to read:

    mlp_out -> mlp_out + up(dropout(relu(down(mlp_out))))      down: hidden -> hidden / reduction, up: back; up = 0

`up` starts at zero, so the adapted model starts exactly as the base. Each adapter is a child module `bottleneck` of
the block's `mlp`, applied by a forward hook on that mlp: no base parameter is renamed or replaced, the base stays
frozen, and only the adapters train.

The saved artifact (`adapter/`): `bottleneck_config.json` (format, sizes, the base's name, where the adapters sit)
and `bottleneck.safetensors` (the adapters' weights, named `model.layers.N.mlp.bottleneck.down.weight` ...), beside
the tokenizer and generation config. `load_bottlenecks(base_model, folder)` puts them back on a freshly loaded base
(that is all generate/eval/chat do). Bottlenecks are non-linear, so they cannot be merged into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck.safetensors"
FORMAT = "tuneforge-bottleneck-v1"


def _mlps(model):
    """(name, module) of each decoder block's feed-forward module."""
    from tuneforge.full_savers import layer_of

    found = [(name, module) for name, module in model.named_modules()
             if name.endswith(".mlp") and layer_of(name + ".") is not None]
    if not found:
        from tuneforge.errors import RecipeError

        raise RecipeError(["`adapter.type`: bottleneck adapters sit after each decoder block's `mlp` module, and this "
                           "model has none by that name; use lora or ia3"])
    return found


def _bottleneck_module(hidden: int, size: int, dropout: float):
    import torch

    class Bottleneck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Linear(hidden, size)
            self.up = torch.nn.Linear(size, hidden)
            self.dropout = torch.nn.Dropout(dropout)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return x + self.up(self.dropout(torch.relu(self.down(x.to(self.down.weight.dtype))))).to(x.dtype)

    return Bottleneck()


def _apply_hook(module, inputs, output):
    return module.bottleneck(output)


def _attach(model, hidden: int, size: int, dropout: float) -> None:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = next(model.parameters()).device
    for _, mlp in _mlps(model):
        mlp.add_module("bottleneck", _bottleneck_module(hidden, size, dropout).to(device=device, dtype=dtype))
        mlp.register_forward_hook(_apply_hook)


def add_bottlenecks(model, adapter):
    """Freeze the base and put a trainable bottleneck after each block's MLP; returns the model."""
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else \
        model.config.hidden_size
    size = max(1, hidden // adapter.bottleneck_reduction)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    _attach(model, hidden, size, adapter.dropout)
    model._tuneforge_bottleneck = {"hidden_size": hidden, "bottleneck_size": size, "dropout": adapter.dropout,
                                   "reduction": adapter.bottleneck_reduction}
    return model


def bottleneck_state(model) -> dict:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if ".bottleneck." in name}


def save_bottlenecks(model, folder, *, base_name: str) -> None:
    """adapter/: the weights and config; `base_name` as other machines find the base (artifacts.portable_base_name)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(bottleneck_state(model), str(folder / WEIGHTS_NAME))
    config = {"format": FORMAT, **model._tuneforge_bottleneck, "base_model_name_or_path": base_name,
              "placement": "after each decoder block's mlp output: out + up(relu(down(out)))",
              "layers": len(_mlps(model))}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_bottleneck_folder(folder) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load_bottlenecks(model, folder):
    """A saved bottleneck adapter on a freshly loaded base (frozen, eval use); returns the model."""
    from safetensors.torch import load_file

    from tuneforge.errors import ModelError

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ModelError(f"{folder / CONFIG_NAME} is not a {FORMAT} adapter", where=str(folder))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    _attach(model, config["hidden_size"], config["bottleneck_size"], config.get("dropout", 0.0))
    state = load_file(str(folder / WEIGHTS_NAME))
    own = dict(model.named_parameters())
    missing = sorted(set(k for k in own if ".bottleneck." in k) - set(state))
    unknown = sorted(set(state) - set(own))
    if missing or unknown:
        raise ModelError(f"{folder} does not fit this base: missing {missing[:3]}, unknown {unknown[:3]}",
                         where=str(folder), fix="load it on the base it was trained on (base_model_name_or_path)")
    import torch

    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
    model._tuneforge_bottleneck = {k: config[k] for k in ("hidden_size", "bottleneck_size", "dropout", "reduction")}
    return model
