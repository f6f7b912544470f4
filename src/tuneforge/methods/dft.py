"""method: dft -- Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629): SFT whose per-token loss is scaled by the
model's own (detached) probability of that token, which the paper shows turns SFT's gradient into a better-behaved,
RL-like update and generalises better than plain SFT on the same data. It is SFT with another loss, so it reads what
SFT reads (conversations, answer-only loss, packing, padding-free micro-batches) and is built on the same TRL
SFTTrainer with `loss_type="dft"`.

Recipe keys read: train.*, adapter.* (as sft). Refused: nothing beyond what sft refuses.
"""

from __future__ import annotations

from tuneforge.methods import Method, register
from tuneforge.methods.common import SUPERVISED_LR_RANGE
from tuneforge.methods.sft import build_trainer as build_sft_trainer


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    return build_sft_trainer(ctx, model, train_dataset, eval_dataset, callbacks, loss_type="dft")


# Learning rates as SFT's: the paper trains with the SFT rates of its base recipes.
register(Method(
    name="dft", family="supervised", data="conversations",
    summary="SFT with each token's loss scaled by its probability (Dynamic Fine-Tuning)",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer,
    seeds="Wu et al. 2025 (DFT)", hooks={"scores": "generation", "few_shot": True, "padding_free": True}))
