"""Checks of the schedule: learning rate (the method's documented range, from the method registry), effective
batch, epochs, warmup and how often the held-out loss is measured."""

from __future__ import annotations

import math

from tuneforge.guide.doctor.core import Context, Finding

BATCH_RANGE = (16, 128)  # seed 000 step 3: effective batch 16 to 128
WARMUP_RANGE = (0.03, 0.1)  # seed 000 step 3 / seed 002: 3% to 10% of the steps
EVAL_EVERY_MAX = 500  # seed 000 "eval too rarely": every 100 or 500 steps


def _rate(value: float) -> str:
    """A learning rate as the seeds write it: 2e-4, 5e-7, 1.5e-5."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def check_learning_rate(ctx: Context):
    """Seed 000 step 3 / common mistakes: 2e-5 to 5e-5 full FT, 1e-4 to 2e-4 LoRA; step 6: 5e-7 to 5e-6 DPO. The
    range and the rate to start from are the method's own (its registry entry)."""
    lr = ctx.recipe.train.lr
    if lr is None:
        return
    from tuneforge.adapter_kinds import lr_type

    spec, preference = ctx.spec, ctx.family == "preference"
    rate_type = lr_type(ctx.recipe.adapter)  # P-tuning v2 has its own rate beside prefix tuning's
    low, high = spec.lr_range_for(rate_type)
    if ctx.family in ("supervised", "distillation"):
        label = "full fine-tuning" if ctx.adapter in ("full", "none") else ctx.adapter
    else:
        label = f"{ctx.method} with {ctx.adapter}"
    if low <= lr <= high:
        return
    far = lr > 10 * high or lr < low / 10
    direction = "high" if lr > high else "low"
    why = ("too high: loss spikes, weights diverge and the model forgets what it knew (catastrophic forgetting)"
           if direction == "high" else "too low: the loss barely moves and the run ends before the model learns the task")
    if preference and direction == "high":
        why = "preference methods are far more sensitive than SFT: a 1e-5 learning rate often wrecks a model under full DPO"
    yield Finding(
        "error" if far else "warning", "lr-out-of-range",
        f"learning rate {lr:g} is {'far ' if far else ''}{direction} for {label} (documented range {low:g} to {high:g})",
        why, f"start at {_rate(spec.default_lr(rate_type))} and bisect from there (set train.lr, or remove it for the "
             "default)",
        ctx.where("train.lr"))


def effective_batch(ctx: Context) -> int:
    """batch_size x grad_accum x devices (the GPUs of device_info; 1 on a CPU)."""
    devices = int(ctx.device_info.get("count", 1) or 1) if ctx.on_gpu else 1
    return ctx.recipe.train.batch_size * ctx.recipe.train.grad_accum * devices


def total_steps(ctx: Context) -> int | None:
    train = ctx.recipe.train
    if train.max_steps:
        return int(train.max_steps)
    if ctx.stats is None or not ctx.stats.train_examples:
        return None
    rows = ctx.stats.train_examples
    if train.packing and ctx.stats.max_length:
        rows = max(1, math.ceil(ctx.stats.train_tokens / ctx.stats.max_length))
    per_epoch = max(1, math.ceil(rows / max(1, effective_batch(ctx))))
    return max(1, int(per_epoch * float(train.epochs)))


def check_effective_batch(ctx: Context):
    """Seed 000 step 3: effective batch (batch_size x grad_accum x devices) 16 to 128."""
    batch = effective_batch(ctx)
    batch_size, grad_accum = ctx.recipe.train.batch_size, ctx.recipe.train.grad_accum
    low, high = BATCH_RANGE
    where = ctx.where("train.grad_accum") + ", " + ctx.where("train.batch_size")
    if batch < low:
        yield Finding("warning", "effective-batch-size",
                      f"effective batch size is {batch} (batch_size x grad_accum{' x devices' if batch != batch_size * grad_accum else ''}), below {low}",
                      "small batches give noisy gradients: the loss jumps around and training is less stable",
                      f"raise train.grad_accum so batch_size x grad_accum is {low} to {high} (e.g. grad_accum {math.ceil(low / max(1, batch_size))})",
                      where)
    elif batch > high:
        yield Finding("warning", "effective-batch-size",
                      f"effective batch size is {batch}, above {high}",
                      "fewer, larger steps: with a fine-tuning-sized dataset the run takes few optimizer steps and the "
                      "learning rate tuned for 16-128 no longer fits",
                      f"lower train.grad_accum (or batch_size) to reach {low} to {high}", where)
    if ctx.stats is not None and ctx.stats.train_examples and batch > ctx.stats.train_examples:
        yield Finding("warning", "effective-batch-size",
                      f"effective batch size {batch} is larger than the training set ({ctx.stats.train_examples} example(s)): "
                      "every epoch is a single optimizer step",
                      "a handful of steps cannot follow a warmup + decay schedule, and the model barely moves",
                      "lower train.grad_accum / batch_size, or add data", where)


def check_epochs(ctx: Context):
    """Seed 000 step 3: 1 epoch suffices for >10K examples, >3 typically overfits; <1K examples: 5 to 10 can help.
    Seed 003: 5+ epochs on a small dataset memorises it. Seed 000 step 6: DPO usually 1 epoch."""
    n = ctx.stats.train_examples if ctx.stats is not None else None
    max_steps = ctx.recipe.train.max_steps
    if max_steps and n:
        epochs = max_steps * effective_batch(ctx) / n
        key = "train.max_steps"
    else:
        epochs = float(ctx.recipe.train.epochs)
        key = "train.epochs"
    if ctx.family == "preference":
        limit, reason = 3, f"{ctx.method} over-trains quickly: once chosen answers are far likelier than rejected ones, more epochs only regress"
    elif n is None:
        limit, reason = 10, "this many passes memorise a fine-tuning dataset"
    elif n >= 10_000:
        limit, reason = 3, f"with {n:,} examples one epoch usually suffices and more than 3 typically overfits"
    elif n >= 1_000:
        limit, reason = 5, f"with {n:,} examples more than 5 epochs memorises the data"
    else:
        limit, reason = 10, f"even with only {n:,} examples (where 5 to 10 epochs can help) more than 10 memorises them"
    if epochs > limit:
        yield Finding("warning", "too-many-epochs",
                      f"{epochs:.1f} epochs over {n:,} training examples" if n else f"{epochs:g} epochs",
                      f"{reason}; the model gets better on the training set and worse on real prompts",
                      f"train for at most {limit} epochs (fewer if the held-out loss turns up), or add data",
                      ctx.where(key))


def check_warmup(ctx: Context):
    """Seed 000 step 3: warmup_ratio 0.03 to 0.1; without it Adam's second moment is unstable early and loss spikes."""
    warmup, scheduler = ctx.recipe.train.warmup, ctx.recipe.train.scheduler
    if warmup is None:
        return
    if float(warmup) == 0:
        yield Finding("warning", "warmup-missing", "no learning-rate warmup (train.warmup is 0)",
                      "Adam's running averages start at zero, so the first ~100 steps take badly scaled steps at full "
                      "learning rate and the loss can spike",
                      f"set train.warmup: 0.03 (3% of the steps; {WARMUP_RANGE[0]:g}-{WARMUP_RANGE[1]:g} is typical)",
                      ctx.where("train.warmup"))
        return
    if scheduler == "constant":
        yield Finding("warning", "warmup-missing",
                      f"train.warmup is {warmup:g} but scheduler `constant` ignores warmup: the run starts at full learning rate",
                      "transformers' constant schedule has no warmup phase, so the warmup you set never happens",
                      "use scheduler: constant_with_warmup (or cosine)", ctx.where("train.scheduler"))
    steps = total_steps(ctx)
    if steps and warmup >= 1 and warmup >= steps:
        yield Finding("warning", "warmup-missing",
                      f"warmup is {int(warmup)} steps but the run has only ~{steps}: it never reaches the peak learning rate",
                      "the whole run is warmup, so the learning rate you chose is never used",
                      "give warmup as a fraction (train.warmup: 0.03)", ctx.where("train.warmup"))


def check_eval_frequency(ctx: Context):
    """Seed 000 common mistakes, "eval too rarely": every 100 or 500 steps, or forgetting goes unnoticed."""
    steps = total_steps(ctx)
    every = ctx.recipe.train.eval_every
    if steps and steps > EVAL_EVERY_MAX and (every is None or every > EVAL_EVERY_MAX):
        yield Finding("info", "eval-too-rare",
                      f"the run has ~{steps} steps and held-out loss is computed " +
                      ("only at the end" if every is None else f"every {every} steps"),
                      "you will not see overfitting or forgetting until the run is over",
                      f"set train.eval_every: {min(EVAL_EVERY_MAX, max(100, steps // 10))}", ctx.where("train.eval_every"))
