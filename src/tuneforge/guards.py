"""Guards that protect a run while it trains: numerical faults, out of memory, and Ctrl-C.

- NaN/inf loss or gradient norm: training stops at that step with a message naming it; checkpoints already
  written stay as they are (nothing is saved after the fault) and the usual fixes are suggested. With
  `train.skip_nonfinite_batches: N`, up to N optimizer steps whose gradients are NaN/inf are skipped instead
  (gradients dropped before the optimizer sees them, so weights and optimizer state are untouched), counted in
  status.json and summary.json; step N+1 stops the run as above.
- Out of memory (torch.OutOfMemoryError, CUDA/MPS/CPU allocator "out of memory" errors) in a training or
  evaluation step: becomes OutOfMemory naming the step, with the memory plan's advice (memory.py: a smaller
  micro-batch with more accumulation, gradient checkpointing, QLoRA), each change with its planned memory. With
  `train.oom_retry: true` the run continues from its last checkpoint with half the micro-batch and twice
  grad_accum (same effective batch: the sampler's order is the same, so each optimizer step sees the same examples).
- Ctrl-C: the first press finishes the current step, saves a checkpoint and stops cleanly (resume with
  `tuneforge train --resume RUN_DIR`); a second press exits at once.

Why wrapping: the Trainer has no hook around a step that can catch an exception, so `install_step_guards` wraps
`training_step` / `prediction_step` on the trainer instance (the only place tuneforge does so) to turn an OOM into
OutOfMemory; everything else here is an ordinary TrainerCallback.
"""

from __future__ import annotations

import gc
import math
import signal

from transformers import TrainerCallback

from tuneforge.errors import DiskFullError, OutOfMemory, TuneforgeError


class NumericalFault(TuneforgeError):
    exit_code = 3


class NumericalGuard(TrainerCallback):
    """Stops at the first NaN/inf loss or gradient norm; with `max_skips` > 0, skips up to that many optimizer steps
    whose gradients are not finite (their steps in `skipped`) and stops at the next one."""

    def __init__(self, max_skips: int = 0, run=None, console=None):
        self.fault: str | None = None
        self.max_skips = max_skips
        self.run = run
        self.console = console
        self.skipped: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.run is not None and self.max_skips:  # a resumed run keeps counting from its checkpoint
            earlier = (self.run.read_json("status.json", {}) or {}).get("skipped_nonfinite_steps") or []
            self.skipped = [s for s in earlier if s <= state.global_step]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.max_skips or model is None:
            return
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.stack([n.float() for n in torch._foreach_norm(grads)]).isfinite().all()):
            return
        step = state.global_step + 1
        for parameter in model.parameters():  # the optimizer skips parameters without a gradient: a true skip
            parameter.grad = None
        self.skipped.append(step)
        if self.run is not None:
            self.run.set_status(self.run.status, skipped_nonfinite_steps=self.skipped)
        if len(self.skipped) > self.max_skips:
            self.fault = (f"gradients became NaN/inf at step {step}: {len(self.skipped)} steps with non-finite "
                          f"gradients (steps {self.skipped}), more than train.skip_nonfinite_batches="
                          f"{self.max_skips}")
            control.should_training_stop = True
            control.should_save = False
        else:
            print(f"step {step}: gradients NaN/inf, step skipped ({len(self.skipped)} of at most {self.max_skips}: "
                  f"train.skip_nonfinite_batches)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.fault:  # after the Trainer's own flow callback, which may have asked for a save at this step
            control.should_save = False
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.fault:
            return
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                if state.global_step in self.skipped:  # a skipped step logs its NaN grad norm; it changed nothing
                    continue
                self.fault = f"{key} became {value} at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = False

    def raise_if_faulted(self, run) -> None:
        if self.fault:
            from tuneforge.checkpoints import complete_checkpoints

            checkpoints = complete_checkpoints(run.path / "checkpoints")  # by step number, complete ones only
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


# ---------------------------------------------------------------------------------------------------------------
# Out of memory

OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory")


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), and the allocators' RuntimeErrors: 'MPS backend out of memory', XPU/HIP out of
    memory, 'DefaultCPUAllocator: can't allocate memory', and Python's MemoryError."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in OOM_TEXT)


def install_step_guards(trainer, recipe, console=None) -> None:
    """Wrap the trainer's training_step and prediction_step so that an out-of-memory error becomes OutOfMemory with
    the step and the memory plan's advice. Call once, after the trainer is built."""

    def guarded(method, phase):
        def step(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 -- only OOM is converted, the rest re-raised as is
                if not is_oom(exc):
                    raise
                detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            # Raised outside the except block: the OOM's traceback (and the activations its frames hold) is freed.
            raise out_of_memory(recipe, step=trainer.state.global_step + (phase == "training"), phase=phase,
                                detail=detail)

        return step

    trainer.training_step = guarded(trainer.training_step, "training")
    trainer.prediction_step = guarded(trainer.prediction_step, "evaluation")


def out_of_memory(recipe, *, step: int | None, phase: str, detail: str) -> OutOfMemory:
    t = recipe.train
    at = f" at step {step}" if step is not None else ""
    changes = oom_advice(recipe)
    if not t.oom_retry and t.batch_size > 1:
        changes.append("or set train.oom_retry: true to continue from the last checkpoint with half the micro-batch "
                       "automatically")
    return OutOfMemory(
        f"out of memory{at} ({phase}, micro-batch {t.batch_size} x up to {t.max_length} tokens): {detail}",
        where="train.batch_size",
        fix="; ".join(changes) + "; see `tuneforge plan RECIPE` for the full memory table",
        step=step, phase=phase,
    )


def oom_advice(recipe) -> list[str]:
    """The memory plan's changes, cheapest first, each with its planned peak when the model's config can be read:
    a smaller micro-batch with more accumulation (same effective batch), gradient checkpointing, QLoRA."""
    t, a = recipe.train, recipe.adapter
    adapter = "full" if a.type == "none" else a.type
    changes: list[tuple[str, dict]] = []
    if t.batch_size > 1:
        half = smaller_batch(t.batch_size)
        changes.append((f"train.batch_size: {half} with train.grad_accum: {t.grad_accum * (t.batch_size // half)} "
                        f"(same effective batch of {t.batch_size * t.grad_accum})", {"batch_size": half}))
    if not t.gradient_checkpointing and a.type != "prefix_tuning":  # the prefix is a cache checkpointing drops
        changes.append(("train.gradient_checkpointing: true (about 30% slower)", {"gradient_checkpointing": True}))
    if adapter != "qlora":
        changes.append(("adapter.type: qlora (4-bit base weights, LoRA on top)", {"adapter": "qlora", "optimizer": None}))
    if t.max_length > 512:
        changes.append((f"train.max_length: {t.max_length // 2} (long examples are truncated, and counted)",
                        {"seq_len": t.max_length // 2}))
    planned = _planned_gib(recipe, [change for _, change in changes])
    if planned is None:
        return [label for label, _ in changes]
    now, after = planned
    out = [f"{label}: ~{gib:.1f} GiB planned" for (label, _), gib in zip(changes, after)]
    if out:
        out[0] = f"now ~{now:.1f} GiB planned; try " + out[0]
    return out


def _planned_gib(recipe, changes: list[dict]):
    """(planned GiB now, [planned GiB after each change]), or None when the model's config cannot be read."""
    try:
        from tuneforge.memory import model_shape, plan_memory, recipe_model_config, recipe_settings
        from tuneforge.models import resolve_model_source

        shape = model_shape(recipe_model_config(recipe, resolve_source=resolve_model_source))
        settings = recipe_settings(recipe)  # the recipe as it runs, in its dtype on this machine's GPU
        now = plan_memory(shape, **settings)["reserved_gib"]
        return now, [plan_memory(shape, **{**settings, **change})["reserved_gib"] for change in changes]
    except Exception:  # noqa: BLE001 -- advice without numbers is still advice
        return None


def train_with_oom_retry(attempt, recipe, run, checkpoint, console):
    """Run `attempt(recipe, checkpoint)`; on OutOfMemory with train.oom_retry, halve train.batch_size, double
    train.grad_accum (the effective batch stays), save that in the run's recipe.yaml and continue from the newest
    complete checkpoint (or from the start). Stops retrying at batch_size 1. An OOM outside the steps becomes
    OutOfMemory with advice, and a full disk outside checkpoint saves (final weights, eval files) DiskFullError."""
    from tuneforge.ranks import is_launched
    from tuneforge.recipe import recipe_to_yaml

    retries = []
    while True:
        detail = None
        try:
            return attempt(recipe, checkpoint)
        except DiskFullError:  # a checkpoint save or a run file: its own message; the other partial files go too
            from tuneforge.checkpoints import remove_partial_files

            remove_partial_files(run)
            raise
        except OutOfMemory as exc:
            if (not recipe.train.oom_retry or recipe.train.batch_size <= 1 or is_launched()
                    or exc.phase not in ("training", "evaluation")):
                raise
            step = exc.step
            exc.__traceback__ = None  # let the failed attempt's model and activations go
        except TuneforgeError:
            raise
        except Exception as exc:  # noqa: BLE001 -- an OOM outside a step (loading, scoring): advice, no retry
            from tuneforge.checkpoints import is_disk_full

            full = is_disk_full(exc, run.path)
            if not full and not is_oom(exc):
                raise
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if detail is not None and full:  # the final weights, a report, an eval file (checkpoints have their own)
            raise _disk_full(run, detail)
        if detail is not None:
            raise out_of_memory(recipe, step=None, phase="outside the training steps (loading or scoring)",
                                detail=detail)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
        t = recipe.train
        old = (t.batch_size, t.grad_accum)
        t.grad_accum, t.batch_size = t.grad_accum * (t.batch_size // smaller_batch(t.batch_size)), smaller_batch(t.batch_size)
        speed = getattr(recipe, "speed", None)
        if speed is not None and getattr(speed, "fold_accumulation", False) not in (False, None):
            speed.fold_accumulation = False  # merging the micro-batches back would undo the retry
        retries.append({"step": step, "batch_size": old[0], "grad_accum": old[1],
                        "new_batch_size": t.batch_size, "new_grad_accum": t.grad_accum})
        checkpoint = _newest_checkpoint(run)
        if run.is_main:
            if checkpoint is None:  # start over: the rows of the failed attempt go
                run.write_text("metrics.jsonl", "")
            run.write_text("recipe.yaml", recipe_to_yaml(recipe))  # a later --resume uses it; whole or as it was
        run.set_status("running", oom_retries=retries)
        console.print(f"[yellow]out of memory at step {step}[/] with micro-batch {old[0]} x grad_accum {old[1]}; "
                      f"retrying with {t.batch_size} x {t.grad_accum} (same effective batch) from "
                      f"{checkpoint.name if checkpoint else 'the start'}")


def _disk_full(run, detail: str):
    """DiskFullError for a full disk outside checkpoint saves, once the half-written files are removed (they are
    useless and hold the space the resume needs)."""
    from tuneforge.checkpoints import _gib, free_bytes, remove_partial_files
    from tuneforge.errors import DiskFullError

    removed = remove_partial_files(run)
    gone = f"; removed the partial {', '.join(p.name for p in removed)}" if removed else ""
    return DiskFullError(f"disk full while writing the run's files ({detail}); {_gib(free_bytes(run.path))} free there"
                         f"{gone}; checkpoints already written are intact", where=str(run.path),
                         fix=f"free space on that disk (or move the run elsewhere), then: tuneforge train --resume "
                         f"{run.path} (continues from the newest checkpoint; set train.save_every to have one)")


def smaller_batch(batch_size: int) -> int:
    """The largest divisor of batch_size that is at most half of it: the effective batch stays exact, and each new
    micro-batch is a slice of an old one (same examples per optimizer step)."""
    return max(d for d in range(1, batch_size // 2 + 1) if batch_size % d == 0) if batch_size > 1 else 1


def _newest_checkpoint(run):
    from tuneforge.checkpoints import complete_checkpoints

    found = complete_checkpoints(run.file("checkpoints"))
    return found[-1] if found else None
