"""The pieces of the ordinary run life (train.py) a federated run calls: given to it by `tuneforge.federated`'s
entry point, not imported here.

train.py imports this package to hand a federated recipe over; if the modules below imported train.py back, they
would all join one import loop with train.py and stages.py (tests/test_architecture.py allows loops of 3 modules).
So the entry point (federated/__init__.py, the one module of this package in that loop) passes train.py's functions
down as a `Pieces`. Functions pickle by reference, so a Flower client process receives them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Pieces:
    load_model: Callable  # (ctx) -> (model, adapter_loaded): base model, EOS aligned, model.adapter loaded
    apply_training_adapter: Callable  # (ctx, model, adapter_loaded) -> the model with the recipe's adapter
    method_datasets: Callable  # (ctx) -> (train, eval) datasets in the form the method's trainer takes
    build_guarded_trainer: Callable  # (ctx, model, train, eval) -> (trainer, numerical, interrupt, plateau)
    absolute_paths: Callable  # (recipe) -> None: data paths made absolute on the run's copy
    run_doctor: Callable  # (recipe, tokenizer, data, console) -> None: preflight errors raise

    @classmethod
    def from_life(cls, life) -> Pieces:
        """From the module that holds the run life (tuneforge.train)."""
        return cls(**{name: getattr(life, name) for name in cls.__dataclass_fields__})
