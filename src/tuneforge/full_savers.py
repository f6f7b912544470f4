"""Full-parameter training that needs less memory than full fine-tuning (seed 000 step 13): the base weights
themselves are trained and the run saves `model/`, an ordinary transformers checkpoint.

- galore   every weight trains, but the AdamW states of the targeted 2-D weights live in a rank-r projection of
           the gradient (GaLore, Zhao et al. 2024: "cuts AdamW state by ~80%"); transformers' `galore_adamw`
           optimizer from the galore-torch package, with `optim_target_modules` and `optim_args` from adapter.galore_*.
- lisa     the embeddings and the head always train; of the decoder layers only `adapter.lisa_layers`, chosen at
           random every `adapter.lisa_interval` steps, are unfrozen (LISA, Pan et al. 2024). The choice for each
           interval is drawn from (train.seed, interval number) alone, so a resumed run picks the same layers as an
           uninterrupted one; the optimizer is built over every weight (a frozen layer's gradient is None, so
           AdamW skips it), and the states of layers leaving the active set are dropped: each period starts the
           layers it activates with a fresh AdamW, as the paper's algorithm does, and memory stays that of the
           active layers.
- spectrum the weight matrices of each kind (q_proj, ..., down_proj) are ranked by their signal-to-noise ratio --
           the singular values above the Marchenko-Pastur edge of a random matrix of that shape and entry spread
           against those below (weight_snr) -- and the top `adapter.spectrum_top_fraction` of each kind are unfrozen (Spectrum,
           Hartford et al. 2024). The scan reads the base weights only, so it picks the same layers on resume.
- freeze   only the named decoder layers train (`adapter.trainable_layers`: the last N, or indices), optionally
           only their parameters whose names contain one of `adapter.trainable_modules` (LLaMA-Factory's freeze).
"""

from __future__ import annotations

import math
import random
import re

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_count(model) -> int:
    found = [layer_of(n) for n, _ in model.named_parameters()]
    return max((i for i in found if i is not None), default=-1) + 1


def _train_only(model, keep) -> int:
    """requires_grad on the parameters `keep(name)` accepts, off elsewhere; returns how many parameters train."""
    count = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(keep(name)))
        count += parameter.numel() if parameter.requires_grad else 0
    return count


def apply_full_saver(model, recipe) -> None:
    adapter = recipe.adapter
    if adapter.type == "galore":
        return  # every weight trains; the optimizer is GaLore's (install_saver_hooks)
    if adapter.type == "freeze":
        layers = frozen_layers_choice(adapter, layer_count(model))
        _train_only(model, lambda n: layer_of(n) in layers and _module_wanted(n, adapter.trainable_modules))
    elif adapter.type == "lisa":
        set_lisa_layers(model, lisa_layers_for(0, recipe, layer_count(model)))
    elif adapter.type == "spectrum":
        chosen = set(spectrum_choice(model, adapter.spectrum_top_fraction))
        _train_only(model, lambda n: n in chosen)


def _module_wanted(name: str, patterns: list[str]) -> bool:
    return not patterns or any(p in name for p in patterns)


def frozen_layers_choice(adapter, n_layers: int) -> set[int]:
    from tuneforge.errors import RecipeError

    if isinstance(adapter.trainable_layers, int):
        if adapter.trainable_layers > n_layers:
            raise RecipeError([f"`adapter.trainable_layers`: {adapter.trainable_layers} is more than the model's "
                               f"{n_layers} layers; set at most {n_layers} (or adapter.type: full)"])
        return set(range(n_layers - adapter.trainable_layers, n_layers))
    bad = [i for i in adapter.trainable_layers if not -n_layers <= i < n_layers]
    if bad:
        raise RecipeError([f"`adapter.trainable_layers`: {bad} are not layers of this model (0..{n_layers - 1}, or "
                           f"-1..-{n_layers} from the end)"])
    return {i % n_layers for i in adapter.trainable_layers}


# ---------------------------------------------------------------------------------------------------------------
# LISA


def lisa_layers_for(step: int, recipe, n_layers: int) -> list[int]:
    """The layers active during the interval that holds `step`: a draw from (seed, interval number) only."""
    adapter = recipe.adapter
    interval = step // adapter.lisa_interval
    rng = random.Random(recipe.train.seed * 1_000_003 + interval)
    return sorted(rng.sample(range(n_layers), min(adapter.lisa_layers, n_layers)))


def set_lisa_layers(model, layers) -> None:
    chosen = set(layers)
    _train_only(model, lambda n: layer_of(n) is None or layer_of(n) in chosen)


def lisa_callback(recipe, n_layers: int):
    from transformers import TrainerCallback

    class LisaLayers(TrainerCallback):
        def __init__(self):
            self.active = None

        def _switch(self, state, model, optimizer):
            layers = lisa_layers_for(state.global_step, recipe, n_layers)
            if layers != self.active:
                set_lisa_layers(model, layers)
                self.active = layers
                if optimizer is not None:  # a new period starts a fresh AdamW for the layers it activates
                    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
                    for parameter in model.parameters():
                        if not parameter.requires_grad:
                            inner.state.pop(parameter, None)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._switch(state, model, optimizer)

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._switch(state, model, optimizer)

    return LisaLayers()


def _optimizer_over_every_weight(trainer) -> None:
    """LISA: the optimizer holds every weight (the Trainer would take only those trainable at creation)."""
    original = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):
        model = trainer.model
        was = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            return original(*args, **kwargs)
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(was[name])

    trainer.create_optimizer = create_optimizer


# ---------------------------------------------------------------------------------------------------------------
# Spectrum


def weight_snr(weight) -> float:
    """Signal-to-noise ratio of one weight matrix: the sum of its singular values above the Marchenko-Pastur edge
    of an i.i.d. matrix of the same shape and entry spread, sigma * (sqrt(rows) + sqrt(cols)), over the sum of those
    below it (module docstring). Spectrum's published script estimates sigma from the singular values' interquartile
    range, which scores pure noise above structured matrices (measured here: a noise matrix 10.5 against 1.2-4.0 for
    the same noise with a rank-4 signal added), so sigma here is the entries' standard deviation, an over-estimate
    when there is signal (which only makes the score conservative)."""
    import torch

    matrix = weight.detach().float()
    values = torch.linalg.svdvals(matrix)
    if values.numel() == 0 or values[0] <= 0:
        return 0.0
    rows, cols = matrix.shape
    edge = float(matrix.std()) * (math.sqrt(rows) + math.sqrt(cols))
    signal = float(values[values > edge].sum())
    noise = float(values[values <= edge].sum())
    return signal / noise if noise > 0 else float("inf")


def spectrum_scan(model) -> dict[str, list[tuple[str, float]]]:
    """{module kind: [(parameter name, snr), ...] highest first} over the decoder layers' 2-D weights."""
    kinds: dict[str, list[tuple[str, float]]] = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() != 2 or layer_of(name) is None or not name.endswith(".weight"):
            continue
        kind = name.rsplit(".", 2)[-2]
        kinds.setdefault(kind, []).append((name, weight_snr(parameter)))
    for kind in kinds:
        kinds[kind].sort(key=lambda item: (-item[1], item[0]))
    return kinds


def spectrum_choice(model, fraction: float) -> list[str]:
    chosen = []
    for entries in spectrum_scan(model).values():
        chosen += [name for name, _ in entries[:max(1, math.ceil(fraction * len(entries)))]]
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------------------
# On the trainer


def galore_optim_args(adapter) -> str:
    return f"rank={adapter.galore_rank},update_proj_gap={adapter.galore_update_proj_gap},scale={adapter.galore_scale}"


PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")  # galore_torch's projection types


def _checkpointable_projectors(optimizer) -> None:
    """GaLore keeps each weight's projector (a Python object holding the projection matrix) in the optimizer state,
    which checkpoints pickle and the Trainer's weights_only load refuses on resume: the state is saved with each
    projector as a plain mapping (its settings and its matrix, a tensor) and rebuilt when loaded."""
    state_dict, load_state_dict = optimizer.state_dict, optimizer.load_state_dict

    def save():
        packed = state_dict()
        for key, entry in list(packed["state"].items()):
            projector = entry.get("projector")
            if projector is not None and not isinstance(projector, dict):
                packed["state"][key] = {**entry, "projector": {
                    "rank": projector.rank, "update_proj_gap": projector.update_proj_gap, "scale": projector.scale,
                    # torch's load_state_dict casts strings element by element: the type goes as its index
                    "proj_type": PROJ_TYPES.index(projector.proj_type), "ortho_matrix": projector.ortho_matrix}}
        return packed

    def load(packed):
        load_state_dict(packed)
        from galore_torch.galore_projector import GaLoreProjector

        for state in optimizer.state.values():
            saved = state.get("projector")
            if isinstance(saved, dict):
                projector = GaLoreProjector(saved["rank"], update_proj_gap=saved["update_proj_gap"],
                                            scale=saved["scale"], proj_type=PROJ_TYPES[int(saved["proj_type"])])
                projector.ortho_matrix = saved["ortho_matrix"]
                state["projector"] = projector

    optimizer.state_dict, optimizer.load_state_dict = save, load


def install_saver_hooks(trainer, recipe) -> None:
    adapter = recipe.adapter
    if adapter.type == "galore":
        trainer.args.optim_target_modules = list(adapter.galore_target_modules)
        trainer.args.optim_args = galore_optim_args(adapter)
        original = trainer.create_optimizer

        def create_optimizer(*args, **kwargs):
            optimizer = original(*args, **kwargs)
            _checkpointable_projectors(getattr(optimizer, "optimizer", optimizer))
            return optimizer

        trainer.create_optimizer = create_optimizer
    elif adapter.type == "lisa":
        trainer.add_callback(lisa_callback(recipe, layer_count(trainer.model)))
        _optimizer_over_every_weight(trainer)
