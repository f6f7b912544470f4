"""Forgetting mitigations that act during training (seed 000 "common mistakes", seed 001 part 12): a KL term that
keeps the tuned model's next-token distribution near the base model's, EWC's penalty on moving the weights the base
model's general ability depends on, and the general probe run every N steps so forgetting is seen as it happens.
(Replay of general data — the first remedy — is data mixing: data/mixing.py.)

- `train.kl_to_base: COEF` — loss += COEF * mean over loss-carrying tokens of KL(p_tuned || p_base). With LoRA the
  reference is the same model with its adapter switched off (PEFT `disable_adapter`), so no second copy is held; for
  full fine-tuning a frozen copy of the starting weights is the reference. Zero at step 0 (tuned = base), it grows
  as the model drifts.
- `train.ewc: {lambda: L, fisher_examples: N}` — loss += L/2 * sum_i F_i (theta_i - theta*_i)^2 over the trainable
  parameters, theta* their values when training starts and F the diagonal Fisher information (mean squared gradient
  of the loss) on N examples of general data (the shipped replay set): weights that matter for general ability are
  expensive to move, the rest are free.
- `eval.forgetting_every: N` — a balanced subset of the probe's multiple-choice items (4 per skill) every N
  optimizer steps, logged to metrics.jsonl as `probe_accuracy` (and plotted with the other logged metrics).

Both loss terms are added by `regularized(trainer_cls)`, a subclass of the method's own trainer (SFT's), so the
method's loss, packing and masking stay as they are; the extra terms are logged as `kl_to_base` and `ewc_penalty`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

IGNORE_INDEX = -100
PROBE_EVERY_PER_SKILL = 4  # eval.forgetting_every scores 4 items of each of the probe's skills (64 items)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def token_kl(logits, ref_logits, labels):
    """Mean over loss-carrying positions of KL(p || p_ref) for next-token prediction (position t predicts t+1)."""
    import torch

    keep = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
    ref = torch.log_softmax(ref_logits[:, :-1][keep].float(), dim=-1)
    return (logp.exp() * (logp - ref)).sum(-1).mean()


@contextmanager
def _adapter_off(model):
    with model.disable_adapter():
        yield


class EWC:
    """The diagonal-Fisher penalty: built once from the model at the start of training."""

    def __init__(self, model, batches, strength: float):
        import torch

        self.strength = strength
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        was_training = model.training
        model.eval()
        count = 0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(**batch)
            out.loss.backward()
            for n, p in self.params.items():
                if p.grad is not None:
                    self.fisher[n] += p.grad.detach().float() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n in self.fisher:
            self.fisher[n] /= max(1, count)
        self.examples = count

    def penalty(self):
        total = 0.0
        for n, p in self.params.items():
            total = total + (self.fisher[n].to(p.device) * (p.float() - self.anchor[n].to(p.device)) ** 2).sum()
        return 0.5 * self.strength * total


def regularized(trainer_cls):
    """`trainer_cls` with the KL-to-base and EWC terms added to its loss (each off unless configured on the instance
    by `configure`)."""

    class Regularized(trainer_cls):
        kl_coef: float = 0.0
        reference = None  # full fine-tuning: a frozen copy; LoRA: None (adapter off)
        ewc: EWC | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if not model.training:  # evaluation: the held-out loss is the task's own, comparable with the base's
                return (loss, outputs) if return_outputs else loss
            extra = {}
            if self.kl_coef:
                import torch

                ref_inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
                with torch.no_grad(), (nullcontext() if self.reference is not None else _adapter_off(model)):
                    ref_logits = (self.reference or model)(**ref_inputs).logits
                # TRL's SFTTrainer computes its loss from a fused LM head and hands back logits recomputed without
                # gradient: the KL needs logits that carry one, so it takes its own forward (one extra pass)
                logits = model(**ref_inputs).logits
                kl = token_kl(logits, ref_logits, inputs["labels"])
                loss = loss + self.kl_coef * kl
                extra["kl_to_base"] = float(kl.detach())
            if self.ewc is not None:
                penalty = self.ewc.penalty()
                loss = loss + penalty
                extra["ewc_penalty"] = float(penalty.detach())
            self._regularizer_logs = extra
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and getattr(self, "_regularizer_logs", None):
                logs = {**logs, **self._regularizer_logs}
            return super().log(logs, *args, **kwargs)

    Regularized.__name__ = Regularized.__qualname__ = f"Regularized{trainer_cls.__name__}"
    return Regularized


def wanted(recipe) -> bool:
    return bool(recipe.train.kl_to_base) or recipe.train.ewc is not None


def frozen_reference(recipe, model):
    """Full fine-tuning with train.kl_to_base: a frozen copy of the starting weights (None otherwise: LoRA switches its
    adapter off instead). Take it BEFORE the trainer is built: TRL's SFTTrainer replaces `model.forward` with a
    closure over the original model (add_fused_lm_head), so a copy made afterwards would still run the live weights
    and its KL would stay exactly zero."""
    if not recipe.train.kl_to_base or hasattr(model, "disable_adapter"):
        return None
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


def configure(trainer, ctx, model, reference=None) -> None:
    """Set the trainer's regularizers from the recipe (call after the adapter is applied, before training);
    `reference`: frozen_reference(), taken before the trainer was built."""
    recipe = ctx.recipe
    if recipe.train.kl_to_base:
        trainer.kl_coef = float(recipe.train.kl_to_base)
        if not hasattr(model, "disable_adapter"):  # full fine-tuning: the starting weights, frozen
            if reference is None:
                raise RuntimeError("train.kl_to_base with full fine-tuning needs mitigations.frozen_reference(), "
                                   "taken before the trainer is built")
            trainer.reference = reference
    if recipe.train.ewc is not None:
        batches = fisher_batches(ctx, recipe.train.ewc.fisher_examples, model)
        trainer.ewc = EWC(model, batches, recipe.train.ewc.strength)
        ctx.console.print(f"[bold]EWC[/] Fisher information from {trainer.ewc.examples} general examples "
                          f"(lambda {recipe.train.ewc.strength:g})")


def fisher_batches(ctx, count: int, model):
    """`count` general examples (the shipped replay set), one per batch, as model inputs with labels."""
    import torch

    from tuneforge.data.pipeline import load_examples, tokenize_all
    from tuneforge.recipe import GENERAL_REPLAY, resolve_path

    examples, _ = load_examples(resolve_path(ctx.recipe, GENERAL_REPLAY), "auto", limit=count)
    items, _, _ = tokenize_all(ctx.tokenizer, examples, ctx.recipe.train.max_length)
    device = next(model.parameters()).device
    for item in items:
        ids = torch.tensor([item.input_ids], device=device)
        yield {"input_ids": ids, "labels": torch.tensor([item.labels], device=device),
               "attention_mask": torch.ones_like(ids)}


def probe_callback(ctx, every: int):
    """A TrainerCallback running the probe's multiple-choice items every `every` steps (logged as probe_accuracy)."""
    from transformers import TrainerCallback

    from tuneforge.evaluate.forgetting import run_probe

    from tuneforge.evaluate.forgetting import load_probe_items

    run, tokenizer = ctx.run, ctx.tokenizer
    items = load_probe_items(per_skill=PROBE_EVERY_PER_SKILL)  # a quick, balanced subset during training

    class ProbeEvery(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every or model is None:
                return
            result = run_probe(model, tokenizer, items=items, instructions=False)
            if run.is_main:
                run.append_metrics({"step": state.global_step, "probe_accuracy": round(result["accuracy"], 2)})

    return ProbeEvery()
