"""Guards that protect a run while it trains: numerical faults and Ctrl-C.

- NaN/inf loss or gradient norm: training stops at that step with a message naming it; checkpoints already
  written stay as they are (nothing is saved after the fault) and the usual fixes are suggested.
- Ctrl-C: the first press finishes the current step, saves a checkpoint and stops cleanly (resume with
  `tuneforge train --resume RUN_DIR`); a second press exits at once.
"""

from __future__ import annotations

import math
import signal

from transformers import TrainerCallback

from tuneforge.errors import TuneforgeError


class NumericalFault(TuneforgeError):
    exit_code = 3


class NumericalGuard(TrainerCallback):
    def __init__(self):
        self.fault: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.fault = f"{key} became {value} at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = False

    def raise_if_faulted(self, run) -> None:
        if self.fault:
            checkpoints = sorted((run.path / "checkpoints").glob("checkpoint-*"))
            kept = f"last good checkpoint: {checkpoints[-1]}" if checkpoints else "no checkpoint was written before it"
            raise NumericalFault(
                f"{self.fault}; training stopped ({kept})",
                fix="lower train.lr (e.g. by 3-10x), use bf16 rather than fp16 (train.precision), keep "
                "train.max_grad_norm at 1.0, and check the data around that step with `tuneforge data preview`",
            )


class InterruptGuard(TrainerCallback):
    """Install with `with InterruptGuard() as guard:` around trainer.train()."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: out now
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping (press again to exit at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
