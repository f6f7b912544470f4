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

from tuneforge.methods import register
from tuneforge.methods.common import common_arguments


def build_trainer(recipe, model, tokenizer, train_dataset, eval_dataset, run, device, callbacks):
    from trl import SFTConfig, SFTTrainer

    from tuneforge import speed

    fields = dict(max_length=recipe.train.max_length, packing=recipe.train.packing, packing_strategy="bfd",
                  dataset_num_proc=None)
    fields.update(speed.sft_arguments(recipe))  # padding-free micro-batches
    args = SFTConfig(**common_arguments(recipe, run, device), **fields)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


register("sft")(build_trainer)
register("cpt")(build_trainer)
