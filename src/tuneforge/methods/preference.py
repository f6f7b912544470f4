"""Preference methods on TRL: dpo (DPOTrainer), kto (KTOTrainer), orpo (ORPOTrainer), simpo and cpo (CPOTrainer,
SimPO = CPO with loss_type simpo and cpo_alpha 0). ORPO/CPO live in trl.experimental in TRL 1.x.

Recipe keys read: preference.* (beta, loss_type, sft_weight, label_smoothing, ref, max_prompt_length, simpo_gamma, cpo_alpha,
desirable_weight, undesirable_weight), train.* (as SFT), model.adapter + model.adapter_mode (start from an SFT
adapter: keep training it, or merge it and train a fresh one; see `load_start_adapter` in methods/common.py).

Reference model (dpo, kto), preference.ref:
  peft         ref_model=None with a PEFT policy: TRL computes reference log-probs with the adapter as it was at the
               start (a fresh adapter disabled; a continued adapter's frozen copy, a few MB). No second model.
  copy         a separate frozen deep copy of the starting model (LoRA merged into it): twice the weights in memory.
  precomputed  reference log-probs for every pair computed once before training (TRL precompute_ref_log_probs),
               then no reference in memory; the memory-tight choice for full fine-tuning.
Refused: ref peft without a LoRA adapter (there is no adapter to disable), packing (doctor), a loss_type the method
does not have.

Data arrives pre-tokenized for dpo and kto (prompt_ids + answer ids from data/preference.py, templated by the
model's chat template exactly as SFT data); orpo/cpo/simpo take the rendered prompt/answer texts (their trainers
tokenize without adding special tokens, so the ids match).
"""

from __future__ import annotations

from tuneforge.errors import RecipeError
from tuneforge.methods import Method, register
from tuneforge.methods.common import PREFERENCE_LR_RANGE, common_arguments

DPO_LOSSES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
KTO_LOSSES = {"kto", "apo_zero_unpaired"}
CPO_LOSSES = {"sigmoid", "hinge", "ipo", "simpo", "alphapo"}
REFERENCE_FREE = {"orpo", "simpo", "cpo"}


def resolved_ref(recipe) -> str:
    ref = recipe.preference.ref
    if ref == "auto":
        return "peft" if recipe.uses_lora else "copy"
    return ref


def check_recipe(recipe) -> None:
    p, method, problems = recipe.preference, recipe.method, []
    losses = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES, "cpo": CPO_LOSSES}.get(method)
    loss = "kto" if method == "kto" and p.loss_type == "sigmoid" else p.loss_type
    if losses is not None and loss not in losses:
        problems.append(f"`preference.loss_type`: {method} has no loss {p.loss_type!r}; choose one of {sorted(losses)}")
    if p.sft_weight and method != "dpo":
        problems.append(f"`preference.sft_weight`: only dpo adds an SFT term ({method} has its own: cpo_alpha for "
                        f"cpo, orpo's odds ratio already includes the NLL); remove it or use method: dpo")
    if method in ("dpo", "kto") and resolved_ref(recipe) == "peft" and not recipe.uses_lora:
        problems.append("`preference.ref`: peft needs a LoRA adapter (the reference is the policy with the adapter "
                        "disabled); with adapter.type full use ref: copy or ref: precomputed")
    if problems:
        raise RecipeError(problems)


def reference_copy(model):
    """A frozen copy of the starting model; a LoRA policy is merged into its copy so the reference is one plain model."""
    import copy

    ref = copy.deepcopy(model)
    if hasattr(ref, "merge_and_unload"):
        ref = ref.merge_and_unload()
    ref.eval()
    for parameter in ref.parameters():
        parameter.requires_grad_(False)
    return ref


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    recipe, tokenizer, run, device = ctx.recipe, ctx.tokenizer, ctx.run, ctx.device
    check_recipe(recipe)
    p, method = recipe.preference, recipe.method
    common = common_arguments(recipe, run, device)
    ref = resolved_ref(recipe)
    ref_model = reference_copy(model) if ref == "copy" and method in ("dpo", "kto") else None
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PretokenizedDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):  # tuneforge already templated and tokenized
                return dataset if "prompt_ids" in dataset.column_names else super()._prepare_dataset(dataset, *args, **kwargs)

        losses, weights = ([p.loss_type, "sft"], [1.0, p.sft_weight]) if p.sft_weight else ([p.loss_type], None)
        args = DPOConfig(**common, max_length=recipe.train.max_length, beta=p.beta, loss_type=losses, loss_weights=weights,
                         label_smoothing=p.label_smoothing, precompute_ref_log_probs=ref == "precomputed",
                         dataset_num_proc=None)
        trainer = PretokenizedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                                         eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks)
        return fresh_adapter_reference(trainer, recipe)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        class PretokenizedKTOTrainer(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if "prompt_ids" not in dataset.column_names:
                    return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
                if self.calculate_KL:  # mismatched (prompt, completion) pairs for the KL estimate, as TRL builds them
                    def rotate(batch):
                        return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

                    dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
                return dataset

        loss = "kto" if p.loss_type == "sigmoid" else p.loss_type
        args = KTOConfig(**common, max_length=recipe.train.max_length, beta=p.beta, loss_type=loss,
                         desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                         precompute_ref_log_probs=ref == "precomputed", train_sampling_strategy="sequential",
                         dataset_num_proc=None)
        trainer = PretokenizedKTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                                         eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks)
        return fresh_adapter_reference(trainer, recipe)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, max_length=recipe.train.max_length, beta=p.beta)
        return ORPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                           processing_class=tokenizer, callbacks=callbacks)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    simpo = method == "simpo"
    args = CPOConfig(**common, max_length=recipe.train.max_length, beta=p.beta,
                     loss_type="simpo" if simpo else p.loss_type, label_smoothing=p.label_smoothing,
                     simpo_gamma=p.simpo_gamma, cpo_alpha=0.0 if simpo else p.cpo_alpha)
    return CPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, callbacks=callbacks)


def fresh_adapter_reference(trainer, recipe):
    """TRL copies a PEFT policy's adapter into a frozen "ref" adapter. A fresh adapter (LoRA B = 0) is the identity,
    so the reference is simply the adapter disabled: drop the copy (no second set of weights). A continued adapter
    (model.adapter, adapter_mode continue) keeps it: the reference is the SFT adapter as loaded, a few MB."""
    continued = recipe.model.adapter and recipe.model.adapter_mode == "continue"
    if not continued and resolved_ref(recipe) == "peft":
        drop_reference_adapter(trainer.model)
    return trainer


# Preference learning rates (seed 000 step 6): far lower than SFT; 5e-7 full, 5e-6 with LoRA (10x, as LoRA's own
# default is over full fine-tuning).
SUMMARIES = {
    "dpo": "direct preference optimisation on (prompt, chosen, rejected) pairs",
    "kto": "preference from unpaired good/bad answers (KTO)",
    "orpo": "SFT + odds-ratio preference term, no reference model",
    "simpo": "reference-free, length-normalised preference loss",
    "cpo": "contrastive preference optimisation (reference-free)",
}
for _name, _summary in SUMMARIES.items():
    register(Method(
        name=_name, family="preference", data="pairs", summary=_summary, lr={"lora": 5e-6, "full": 5e-7},
        lr_range=PREFERENCE_LR_RANGE, build_trainer=build_trainer, reads=("preference",), seeds="seed 000 step 6",
        hooks={"scores": "generation"}))


def preference_datasets(recipe, data):
    """(train, eval) datasets in the form the method's trainer takes."""
    from tuneforge.data.preference import preference_dataset, preference_text_dataset

    to = preference_text_dataset if recipe.method in REFERENCE_FREE else preference_dataset
    return to(data.train_pairs), (to(data.eval_pairs) if data.eval_pairs else None)


def drop_reference_adapter(model) -> None:
    """TRL adds a frozen "ref" copy of a continued adapter; it is not part of the result, so it is not saved."""
    config = getattr(model, "peft_config", None)
    if config and "ref" in config:
        model.delete_adapter("ref")


# ---------------------------------------------------------------------------------------------------------------
# Held-out preference accuracy


def answer_logps(model, tokenizer, pairs, *, batch_size: int = 8) -> list[dict]:
    """Per pair: summed and per-token-mean log-prob of the chosen and rejected answers given the prompt."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for pair in pairs:
        rows.append((pair.prompt_ids, pair.chosen_ids))
        rows.append((pair.prompt_ids, pair.rejected_ids))
    sums, counts = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            answer = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (p, a) in enumerate(chunk):
                ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                mask[i, :len(p) + len(a)] = 1
                answer[i, len(p):len(p) + len(a)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            target = answer[:, 1:].to(device)
            sums += (logps * target).sum(dim=1).tolist()
            counts += target.sum(dim=1).tolist()
    model.train(was_training)
    return [{"chosen": sums[2 * i], "rejected": sums[2 * i + 1], "chosen_mean": sums[2 * i] / max(1, counts[2 * i]),
             "rejected_mean": sums[2 * i + 1] / max(1, counts[2 * i + 1])} for i in range(len(pairs))]


def preference_accuracy(current: list[dict], start: list[dict] | None = None, beta: float = 0.1) -> dict:
    """Accuracy on held-out pairs, in %:
    reference_free  mean per-token log-prob of chosen > rejected (length-normalised; comparable before and after);
    chosen_logp / rejected_logp  mean per-token log-prob of each side (their drift shows whether DPO raised the
                    chosen answers or only pushed both down: the case where generations do not change);
    implicit_reward DPO's implicit reward beta*(log pi - log pi_start) larger for chosen than rejected, the start
                    model (the reference) as baseline: 50 by construction before training (ties count half)."""
    n = len(current)
    if not n:
        return {"n": 0}
    free = sum(c["chosen_mean"] > c["rejected_mean"] for c in current) / n
    out = {"n": n, "reference_free": round(100 * free, 1),
           "mean_logp_margin": round(sum(c["chosen_mean"] - c["rejected_mean"] for c in current) / n, 4),
           "chosen_logp": round(sum(c["chosen_mean"] for c in current) / n, 4),
           "rejected_logp": round(sum(c["rejected_mean"] for c in current) / n, 4)}
    if start is not None:
        margins = [beta * ((c["chosen"] - s["chosen"]) - (c["rejected"] - s["rejected"])) for c, s in zip(current, start)]
        wins = sum(1.0 if m > 1e-6 else 0.5 if abs(m) <= 1e-6 else 0.0 for m in margins)
        out["implicit_reward"] = round(100 * wins / n, 1)
        out["implicit_reward_margin"] = round(sum(margins) / n, 4)
    return out
