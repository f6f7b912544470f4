"""Training progress on the terminal (rich) and into metrics.jsonl: step, loss, lr, tokens/s, ETA."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    """One rich progress bar for the run; every log row also goes to the run directory's metrics.jsonl."""

    def __init__(self, run, console=None, enabled: bool = True):
        self.run = run
        self.console = console
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.last_time = None
        self.last_tokens = 0
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.start = self.last_time = time.time()
        self.last_tokens = state.num_input_tokens_seen or 0
        if self.enabled and state.is_world_process_zero:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        if self.start is None:  # an evaluation before training starts
            self.start = self.last_time = now
        tokens = state.num_input_tokens_seen or 0
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": round(now - self.start, 3)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs and now > self.last_time:
            row["tokens_per_s"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            self.last_time, self.last_tokens = now, tokens
        row["tokens_seen"] = tokens
        self.run.append_metrics(row)
        if self.progress is not None and "loss" in logs:
            info = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  {row.get('tokens_per_s', 0):,.0f} tok/s"
            self.progress.update(self.task, info=info)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        from tuneforge.ranks import allow_training_wrap_after_evaluate

        allow_training_wrap_after_evaluate(model, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
