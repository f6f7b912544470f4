"""method: gkd -- distillation (seed 000 step 13: "train a small student model to mimic a larger teacher") with TRL's
experimental GKDTrainer (generalised knowledge distillation, on-policy): the student learns the teacher's full
next-token distribution on the data's answers and, a share rl.gkd_lambda of the time, on its own sampled answers.

Recipe keys: rl.teacher (required: a model name, folder, embedded:..., or a tuneforge run directory, merged if it is
an adapter run), rl.gkd_lambda (0.5, on-policy share), rl.gkd_beta (0.5: generalised JSD between forward and reverse
KL), rl.temperature, rl.max_new_tokens; data as SFT (messages / prompt+completion, templated by the chat template);
train.* as SFT (gkd is supervised: SFT learning rates).
Refused: a teacher with a different vocabulary (GKD compares full distributions).
"""

from __future__ import annotations

from tuneforge.errors import ModelError, RecipeError
from tuneforge.methods import Method, register
from tuneforge.methods.common import NO_PACKING, SUPERVISED_LR_RANGE, common_arguments


def load_teacher(recipe, device: str):
    from tuneforge.models import load_target

    try:
        # the user's own recipe says whether model code may run; a teacher run's saved recipe never does
        teacher, tokenizer = load_target(recipe.rl.teacher, device=device, trust_remote_code=recipe.model.trust_remote_code)
    except ModelError as exc:
        raise ModelError(exc.message, where="rl.teacher", fix=exc.fix) from None
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher, tokenizer


def conversation_dataset(examples: list[dict]):
    """SFT examples -> the `messages` rows GKD's ChatML collator templates itself."""
    from datasets import Dataset

    rows = []
    for example in examples:
        if "messages" not in example:
            raise RecipeError(["`data.train`: method gkd distils on conversations (messages or prompt/completion "
                               "records), not plain text"])
        rows.append([{"role": m["role"], "content": m["content"]} for m in example["messages"]])
    return Dataset.from_dict({"messages": rows})


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    recipe, tokenizer, run, device = ctx.recipe, ctx.tokenizer, ctx.run, ctx.device
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rl = recipe.rl
    teacher, teacher_tokenizer = load_teacher(recipe, device)
    if teacher.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
        raise RecipeError([f"`rl.teacher`: {rl.teacher} has vocab_size {teacher.config.get_text_config().vocab_size}, "
                           f"the student {model.config.get_text_config().vocab_size}; GKD needs a teacher with the same "
                           f"tokenizer (e.g. a larger model of the same family)"])
    args = GKDConfig(**common_arguments(recipe, run, device), max_length=recipe.train.max_length, lmbda=rl.gkd_lambda,
                     beta=rl.gkd_beta, temperature=rl.temperature, max_new_tokens=rl.max_new_tokens,
                     disable_dropout=True)
    return GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks)


def _needs_teacher(recipe) -> list[tuple[str, str]]:
    if not recipe.rl.teacher:
        return [("rl.teacher", "method gkd distils a teacher model into this one: set rl.teacher (a model name, "
                               "folder or run directory sharing this model's tokenizer)")]
    return []


# gkd is supervised (a KL to the teacher on SFT data), so it keeps the SFT learning rates.
register(Method(
    name="gkd", family="distillation", data="conversations", summary="distillation from rl.teacher (generalised KD)",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer, reads=("rl",),
    refuses=(NO_PACKING,), check=_needs_teacher, seeds="seed 001 (distillation)", hooks={"scores": "generation"}))
