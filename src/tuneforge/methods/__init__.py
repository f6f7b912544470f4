"""The method registry. A method is one module in this package that declares itself with `register(Method(...))`:
its family and data kind, its defaults and documented ranges, the recipe sections it reads, the keys it refuses, and
the functions that build its trainer and score the model before and after. Everything else -- the recipe schema's
list of methods and its learning-rate defaults, `doctor`, `recommend`, `plan` and the README's method table -- reads
its lists and defaults from here.

Adding a method is one new file here (plus a recipe and a test): the registry finds every module of this package
that registers a method. Method modules keep their heavy imports (torch, trl) inside functions, so reading the
declarations is cheap, and they never import `tuneforge.recipe` (they receive the recipe object), so the schema can
depend on the registry without a loop.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

FAMILIES = ("supervised", "preference", "reward", "rl", "distillation", "classification")
DATA_KINDS = ("conversations", "text", "pairs", "prompts", "labels")  # labels: {"text", "label"} records


def _lora_or_full(adapter_type: str) -> str:
    return "lora" if adapter_type in ("lora", "qlora") else "full"


@dataclass(frozen=True)
class Refusal:
    """A recipe key this method cannot honour: `applies(recipe)` says whether the recipe asks for it anyway."""

    key: str
    applies: Callable
    why: str


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # one of FAMILIES
    data: str  # one of DATA_KINDS: what data.train holds
    summary: str  # one line: the schema's description and the README's method table
    lr: dict  # default learning rate: {"lora": ..., "full": ...} ("lora" covers qlora, "full" covers none)
    lr_range: dict  # documented range per adapter kind: outside it `doctor` warns
    build_trainer: Callable  # (ctx: run.RunContext, model, train_dataset, eval_dataset, callbacks) -> Trainer
    reads: tuple = ()  # recipe sections beyond model/data/adapter/quant/train/eval/speed that it reads
    refuses: tuple = ()  # Refusal(key, applies, why): keys it cannot honour, refused before a run directory exists
    check: Callable | None = None  # recipe -> [(key, problem)]: what it needs from the rest of the recipe
    kl: float | None = None  # default KL coefficient to the reference (rl.kl_coef) where the method has one
    resumable: bool = True  # --resume continues it from a checkpoint
    seeds: str = ""  # where the seeds document it (shown by `doctor` and the README table)
    # What the run's life (train.py) and speed/ ask of the method, by name:
    #   scores        how it is scored before/after: generation | loss | pairwise | rewards (scores.py; default loss)
    #   few_shot      the prompt-only few-shot baseline applies (answers to compare against)
    #   padding_free  its trainer takes padding-free micro-batches (speed.padding_free), as TRL's SFTTrainer does
    #   load_model    ctx -> the model to train, instead of the causal LM (classify: a sequence-classification head)
    #   adapter       (ctx, model) -> the model wrapped for training, instead of adapters.apply_adapter
    #   datasets      ctx -> (train, eval) datasets in the form its trainer takes
    hooks: dict = field(default_factory=dict)

    def default_lr(self, adapter_type: str) -> float:
        from tuneforge.adapter_kinds import lr_kind  # ia3, soft prompts ...: a multiple of the LoRA rate

        kind, scale = lr_kind(adapter_type)
        return self.lr[kind] if scale == 1.0 else float(f"{self.lr[kind] * scale:.3g}")

    def lr_range_for(self, adapter_type: str) -> tuple[float, float]:
        from tuneforge.adapter_kinds import lr_kind

        kind, scale = lr_kind(adapter_type)
        low, high = self.lr_range[kind]
        return (low * scale, high * scale) if scale != 1.0 else (low, high)

    def refusals(self, recipe) -> list[tuple[str, str]]:
        """(key, why) for every key the recipe sets that this method cannot honour, and everything `check` finds."""
        found = [(r.key, r.why) for r in self.refuses if r.applies(recipe)]
        return found + (list(self.check(recipe)) if self.check else [])


_REGISTRY: dict[str, Method] = {}
_DISCOVERED = False


def register(method: Method) -> Method:
    """Called once per method, at the bottom of its module. A name registered twice is a bug."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.family not in FAMILIES or method.data not in DATA_KINDS:
        raise ValueError(f"method {method.name!r}: family must be one of {FAMILIES}, data one of {DATA_KINDS}")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    """Import every module of this package once, so each registers its methods."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _DISCOVERED = True


def method_names() -> list[str]:
    """Every method, family by family (FAMILIES' order), in registration order within a family."""
    _discover()
    return sorted(_REGISTRY, key=lambda name: FAMILIES.index(_REGISTRY[name].family))


def method_spec(name: str) -> Method:
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def methods_in(*families: str) -> tuple[str, ...]:
    """The names of the methods of these families, in registration order."""
    return tuple(name for name in method_names() if _REGISTRY[name].family in families)


def get_method(name: str) -> Callable:
    """The method's trainer builder."""
    return method_spec(name).build_trainer


def format_rate(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def methods_markdown() -> str:
    """The README's method table, from the declarations (tests/test_architecture.py keeps the README equal to it)."""
    lines = ["| method | family | data | learning rate (LoRA / full) | KL | what it trains |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in method_names():
        m = _REGISTRY[name]
        kl = "" if m.kl is None else f"{m.kl:g}"
        lines.append(f"| `{name}` | {m.family} | {m.data} | {format_rate(m.lr['lora'])} / {format_rate(m.lr['full'])} | {kl} | "
                     f"{m.summary} |")
    return "\n".join(lines)
