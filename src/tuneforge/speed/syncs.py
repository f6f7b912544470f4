"""speed.fewer_syncs: the host stops waiting for the GPU inside a training step.

Why: on a small model the step is bound by the host (Python and kernel launches): the CPU must stay ahead of the
GPU, queueing the next kernels while the current ones run. Every read of a GPU value into Python (`.item()`,
`if tensor:`) drains that queue; the CPU's launch work after it then runs while the GPU idles. A profile of 1B full
fine-tuning on an H100 counted 36 such syncs in two steps (Unsloth: 16) with the GPU busy 58% of the time
(bench/results/2026-12-07-speed-fair-h100-qwen-1bfull.md). Counted by line on CPU
(bench/results/2026-12-07-syncs-cpu-tiny-full.txt), per micro-batch, 8 of them are bookkeeping that can wait:

  - TRL's SFTTrainer.compute_loss reads its entropy and token-accuracy metrics (4) and its token count (1) into
    Python on every micro-batch, for a log written every `logging_steps`;
  - transformers' Trainer checks each micro-batch's loss for NaN/inf (`logging_nan_inf_filter`, 2) to keep a
    non-finite loss out of the logged average;
  - transformers' Trainer counts the non-padding input tokens (`include_num_input_tokens_seen`, 1).

With the lever on, the same numbers are computed on the device and read once, when the Trainer logs or saves:
  - the loss is TRL's own fused-LM-head loss, computed the way TRL computes it (`_plain_loss` below: the only
    lines of TRL repeated here, because the metrics TRL reads sit in the middle of the same method); the metrics
    go to TRL's `_metrics` lists at log time, per micro-batch as TRL keeps them;
  - the NaN/inf filter becomes arithmetic: a non-finite step loss is replaced, on the device, by exactly what the
    Trainer's filter adds in its place (the running loss over the steps since the last log);
  - the token count stays a device tensor until the log or checkpoint that reads it.
Losses, gradients and every logged value are the plain path's (tests/test_speed.py); the syncs left are the
logging reads themselves, the gradient clipping and transformers' packed-sequence check in the mask code.

Off by default until measured on a GPU against itself off (bench/levers_gpu.sh); `auto` turns it on with CUDA.
Where it applies: sft/cpt on TRL's SFTTrainer (its own compute_loss: not DFT or distillation, whose trainers
replace it, nor train.kl_to_base / train.ewc, which add their term there), one process (several would need the
metrics gathered across ranks, which TRL does per micro-batch). `speed.resolve` refuses `true` elsewhere.
"""

from __future__ import annotations


def applies(trainer) -> str | None:
    """Why the lever cannot act on this trainer, or None when it can."""
    from trl import SFTTrainer

    if not isinstance(trainer, SFTTrainer) or type(trainer).compute_loss is not SFTTrainer.compute_loss:
        return "the trainer is not TRL's plain SFTTrainer (its loss is computed elsewhere)"
    if getattr(trainer.args, "world_size", 1) > 1:
        return f"{trainer.args.world_size} processes train together (metrics are gathered across ranks)"
    return None


def _plain(trainer) -> bool:
    """TRL computes this micro-batch's loss on its plain fused-LM-head path (the one `_plain_loss` repeats)."""
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    return (trainer.model.training and trainer.compute_loss_func is None and trainer.label_smoother is None
            and trainer.args.loss_type == "nll" and not trainer.aux_loss_enabled
            and not (parallelism is not None and getattr(parallelism, "sp_enabled", False)))


def _plain_loss(trainer, model, inputs, num_items_in_batch):
    """TRL SFTTrainer.compute_loss's fused-LM-head path (trl 1.16 sft_trainer.py): the loss, and the outputs whose
    metrics TRL reads."""
    import torch

    inputs["use_cache"] = False
    outputs = model(**inputs, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    return loss, outputs


class Pending:
    """What TRL and the Trainer would have read into Python on each micro-batch, kept on the device until read."""

    def __init__(self):
        self.entropy: list = []  # per micro-batch, as TRL appends them
        self.accuracy: list = []
        self.train_tokens = []  # TRL's token count (ints, or device sums for padded batches)
        self.input_tokens = []  # the Trainer's num_input_tokens_seen

    def add_metrics(self, outputs, inputs) -> None:
        import torch

        valid = outputs.label_mask.sum()
        safe = valid.clamp(min=1)
        zero = torch.zeros((), device=valid.device)
        self.entropy.append(torch.where(valid > 0, outputs.entropy.detach().sum() / safe, zero))
        self.accuracy.append(torch.where(valid > 0, outputs.is_top1.sum() / safe, zero))
        if "attention_mask" in inputs:
            self.train_tokens.append(inputs["attention_mask"].sum())
        elif "position_ids" in inputs:
            self.train_tokens.append(inputs["position_ids"].size(1))  # a shape: no device read
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")  # TRL's own check

    def flush(self, trainer) -> None:
        """Read everything pending (one transfer) into the places TRL and the Trainer keep it."""
        import torch

        tensors = [t for t in self.entropy + self.accuracy + self.train_tokens + self.input_tokens
                   if isinstance(t, torch.Tensor)]
        if not tensors:
            return
        values = iter(torch.stack([t.double() for t in tensors]).tolist())

        def read(items):
            return [next(values) if isinstance(item, torch.Tensor) else item for item in items]

        entropy, accuracy = read(self.entropy), read(self.accuracy)
        train_tokens, input_tokens = read(self.train_tokens), read(self.input_tokens)
        metrics = trainer._metrics["train"]
        metrics["entropy"].extend(float(v) for v in entropy)
        metrics["mean_token_accuracy"].extend(float(v) for v in accuracy)
        if train_tokens:
            for count in train_tokens:
                trainer._total_train_tokens += int(count) // trainer._tp_size
            metrics["num_tokens"] = [trainer._total_train_tokens]
        trainer.state.num_input_tokens_seen += sum(int(v) for v in input_tokens)
        self.entropy, self.accuracy, self.train_tokens, self.input_tokens = [], [], [], []


def install(trainer) -> Pending:
    """Make `trainer` keep its per-micro-batch bookkeeping on the device (see the module's docstring)."""
    why = applies(trainer)
    if why:
        raise ValueError(f"speed.fewer_syncs cannot act here: {why}")
    import torch

    pending = Pending()
    compute_loss, training_step = trainer.compute_loss, trainer.training_step
    track_tokens, log, save = trainer._track_num_input_tokens, trainer.log, trainer._save_checkpoint
    filter_nonfinite = trainer.args.logging_nan_inf_filter
    trainer.args.logging_nan_inf_filter = False  # done below, on the device

    def fewer_syncs_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not _plain(trainer):
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = _plain_loss(trainer, model, inputs, num_items_in_batch)
        pending.add_metrics(outputs, inputs)
        return loss

    def fewer_syncs_training_step(model, inputs, num_items_in_batch=None):
        loss = training_step(model, inputs, num_items_in_batch)
        if not filter_nonfinite:
            return loss
        # transformers' filter: a NaN/inf step adds the running loss's average since the last log instead of itself
        instead = trainer._tr_loss / (1 + trainer.state.global_step - trainer._globalstep_last_logged)
        return torch.where(torch.isfinite(loss), loss, instead.to(loss.dtype))

    def fewer_syncs_track_tokens(inputs):
        mode = trainer.args.include_num_input_tokens_seen
        main = getattr(trainer.model, "main_input_name", "input_ids")
        if mode in ("no", False) or main not in inputs:
            return track_tokens(inputs)
        if mode == "non_padding" and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif mode == "non_padding" and getattr(trainer.processing_class, "pad_token_id", None) is not None:
            count = (inputs[main] != trainer.processing_class.pad_token_id).sum()
        else:
            return track_tokens(inputs)  # counts a shape: no device read
        pending.input_tokens.append(count)

    def fewer_syncs_log(logs, start_time=None):
        pending.flush(trainer)
        return log(logs, start_time)

    def fewer_syncs_save_checkpoint(model, trial):
        pending.flush(trainer)  # the saved trainer state holds the token count
        return save(model, trial)

    trainer.compute_loss, trainer.training_step = fewer_syncs_compute_loss, fewer_syncs_training_step
    trainer._track_num_input_tokens, trainer.log = fewer_syncs_track_tokens, fewer_syncs_log
    trainer._save_checkpoint = fewer_syncs_save_checkpoint
    return pending
