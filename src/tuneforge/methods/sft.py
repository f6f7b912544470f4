"""SFT and continued pre-training (CPT) on TRL's SFTTrainer.

Recipe keys read: train.* (epochs, max_steps, lr, batch_size, grad_accum, max_length, packing, scheduler, warmup,
weight_decay, optimizer, gradient_checkpointing, precision, seed, eval_every, save_every), adapter.* via
adapters.py. Data arrives pre-tokenized from tuneforge's pipeline (input_ids + labels with -100 on every token
that is not an assistant answer, or on none for CPT), so TRL neither re-templates nor re-masks it.

Packing uses TRL's best-fit-decreasing packer in padding-free form: examples are concatenated with position ids
that restart at each example, and attention never crosses an example boundary (flash-attention varlen on GPU;
transformers derives a block-diagonal mask from the position ids for sdpa/eager).
"""

from __future__ import annotations

from tuneforge.methods import Method, register
from tuneforge.methods.common import SUPERVISED_LR_RANGE, common_arguments


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks, trainer_cls=None, **config):
    """TRL's SFTTrainer on tuneforge's pre-tokenized data; `config`: further SFTConfig fields, and `trainer_cls` an
    SFTTrainer subclass, for methods that are SFT with another loss (methods/dft.py, methods/distill.py)."""
    recipe, tokenizer, run, device = ctx.recipe, ctx.tokenizer, ctx.run, ctx.device
    from trl import SFTConfig, SFTTrainer

    from tuneforge import speed

    fields = dict(max_length=recipe.train.max_length, packing=recipe.train.packing, packing_strategy="bfd",
                  dataset_num_proc=None, **config)
    fields.update(speed.sft_arguments(recipe))  # padding-free micro-batches
    args = SFTConfig(**common_arguments(recipe, run, device), **fields)
    from tuneforge import mitigations

    trainer_cls = trainer_cls or SFTTrainer
    trainer_cls = mitigations.regularized(trainer_cls) if mitigations.wanted(recipe) else trainer_cls
    reference = mitigations.frozen_reference(recipe, model)  # before the trainer patches model.forward
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if mitigations.wanted(recipe):  # train.kl_to_base / train.ewc: terms added to the SFT loss
        mitigations.configure(trainer, ctx, trainer.model, reference)
    return trainer


# Learning rates: seed 000 steps 3-5 and "common mistakes": 2e-4 LoRA/QLoRA, 2e-5 full fine-tuning.
register(Method(
    name="sft", family="supervised", data="conversations", summary="loss on the answers only (prompts masked)",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer,
    seeds="seed 000 steps 3-5", hooks={"scores": "generation", "few_shot": True, "padding_free": True}))


def _cpt_format(recipe) -> list[tuple[str, str]]:
    if recipe.data.format not in ("auto", "text"):
        return [("data.format", f"method cpt trains on plain text; data.format must be text or auto "
                                f"(got {recipe.data.format!r})")]
    return []


register(Method(
    name="cpt", family="supervised", data="text",
    summary="continued pre-training on plain text, loss on every token",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer, check=_cpt_format,
    seeds="seed 000 (continued pre-training)", hooks={"scores": "loss", "padding_free": True}))
