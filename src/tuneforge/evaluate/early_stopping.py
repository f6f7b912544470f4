"""Early stopping on a plateau of the held-out loss, and which step (and checkpoint) was best.

transformers' own EarlyStoppingCallback needs `load_best_model_at_end=True` and a checkpoint at every evaluation;
this one needs neither. It watches a metric at each evaluation (eval_loss by default, lower is better):
an evaluation counts as an improvement when it beats the best so far by more than `min_delta`; after `patience`
evaluations in a row without one, training stops. It records the best step, and the checkpoint saved at that
step if there is one (with `save_best=True` it asks the Trainer to save a checkpoint at every new best, so the
best weights always exist under checkpoints/).

Recipe keys: train.early_stopping.patience, .min_delta, .metric (it needs train.eval_every). train.py asks for a
checkpoint at every new best (save_best) and, when training ends past the best step, loads that checkpoint back
(`restore_best`), so the weights saved and scored are the best ones.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback


class PlateauStopping(TrainerCallback):
    def __init__(self, patience: int = 3, min_delta: float = 0.0, metric: str = "eval_loss",
                 greater_is_better: bool = False, save_best: bool = False):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 (got {patience})")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0 (got {min_delta})")
        self.patience = patience
        self.min_delta = min_delta
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater_is_better = greater_is_better
        self.save_best = save_best
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evaluations = 0
        self.stopped_step: int | None = None
        self.history: list[tuple[int, float]] = []
        self.output_dir: str | None = None

    def improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.greater_is_better:
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def on_train_begin(self, args, state, control, **kwargs):
        self.output_dir = args.output_dir

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        step = state.global_step
        counted = {s for s, _ in self.history}
        self.history.append((step, float(value)))
        # An evaluation before training (the baseline) is not a candidate, and a second evaluation of the same
        # step (the final one after training) is not new evidence: neither counts.
        if step == 0 or step in counted:
            return
        if self.improved(value):
            self.best_value, self.best_step, self.bad_evaluations = float(value), step, 0
            if self.save_best:
                control.should_save = True
        else:
            self.bad_evaluations += 1
            if self.bad_evaluations >= self.patience:
                self.stopped_step = step
                control.should_training_stop = True

    def best_checkpoint(self, output_dir: str | Path | None = None) -> Path | None:
        """checkpoint-<best step> under the Trainer's output directory, if it was saved."""
        folder = output_dir or self.output_dir
        if folder is None or self.best_step is None:
            return None
        path = Path(folder) / f"checkpoint-{self.best_step}"
        return path if path.is_dir() else None

    def restore_best(self, trainer, output_dir: str | Path | None = None) -> Path | None:
        """Load the best checkpoint's weights into the trainer's model (seed 002: load_best_model_at_end), when the
        last step is not the best; returns the checkpoint loaded, or None when the last weights are the best."""
        checkpoint = self.best_checkpoint(output_dir)
        if checkpoint is None or self.best_step == trainer.state.global_step:
            return None
        # The Trainer's own loader (what load_best_model_at_end calls): adapters or full weights, sharded or not.
        trainer._load_from_checkpoint(str(checkpoint))
        self.restored = str(checkpoint)
        return checkpoint

    def summary(self, output_dir: str | Path | None = None) -> dict:
        """What to save in the run directory (e.g. eval/early_stopping.json) and show in the report."""
        checkpoint = self.best_checkpoint(output_dir)
        return {
            "metric": self.metric,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "stopped_early": self.stopped_step is not None,
            "stopped_at_step": self.stopped_step,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "best_checkpoint": str(checkpoint) if checkpoint else None,
            "restored": getattr(self, "restored", None),  # the weights saved are this checkpoint's (None: the last)
            "evaluations": [{"step": s, "value": v} for s, v in self.history],
        }
