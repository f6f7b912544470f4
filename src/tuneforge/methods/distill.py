"""method: distill -- offline knowledge distillation (seed 000 step 13: "train a small student to mimic a larger
teacher"): the teacher scores the training data once, keeping at each answer position its top-k next-token
log-probabilities (int32 ids + float16 log-probs: k x 6 bytes a position instead of a vocabulary of floats), and the
student trains on a mix of the KL to those distributions and the usual cross-entropy on the answers:

    loss = alpha * T^2 * KL(teacher_T || student_T over the teacher's top-k) + (1 - alpha) * CE

(T = distill.temperature; the T^2 keeps the KL's gradient scale as T changes, as in Hinton et al.). Both
distributions are taken over the teacher's top-k ids and renormalised there, so a student that agrees with the
teacher scores 0; the cross-entropy term keeps the student's mass on the answer across the whole vocabulary.
Unlike gkd (on-policy, TRL's GKDTrainer, the teacher runs every step), the teacher runs once, before training, and
is then freed. The teacher's own held-out scores are recorded beside the student's (summary.json `distill`).

Recipe keys: distill.teacher (required: a model name, folder, embedded:..., or a tuneforge run directory),
distill.alpha (0.5), distill.temperature (2.0), distill.top_k (20); data and train.* as SFT.
Refused: a teacher with another tokenizer (the distributions would be over different tokens), packing and padding-free
batches (the teacher's scores are looked up per example).
"""

from __future__ import annotations

from tuneforge.errors import RecipeError
from tuneforge.methods import Method, Refusal, register
from tuneforge.methods.common import NO_PACKING, SUPERVISED_LR_RANGE

IGNORE_INDEX = -100


def teacher_top_k(teacher, items, *, k: int, temperature: float, batch_size: int = 8) -> dict:
    """{tuple(input_ids): (ids [positions, k] int32, log-probs [positions, k] float16)} at every position whose next
    token carries loss (the answers), for each tokenized example."""
    import torch

    device = next(teacher.parameters()).device
    table = {}
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        width = max(len(t.input_ids) for t in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, item in enumerate(batch):
            ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            mask[row, : len(item.input_ids)] = 1
        with torch.no_grad():
            logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for row, item in enumerate(batch):
            positions = [t for t in range(len(item.input_ids) - 1) if item.labels[t + 1] != IGNORE_INDEX]
            scaled = torch.log_softmax(logits[row, positions] / temperature, dim=-1)
            top = scaled.topk(min(k, scaled.shape[-1]), dim=-1)
            renormalised = top.values - torch.logsumexp(top.values, dim=-1, keepdim=True)
            table[tuple(item.input_ids)] = (top.indices.to(torch.int32).cpu(), renormalised.to(torch.float16).cpu())
    return table


def sparse_kl(logits, input_ids, attention_mask, labels, table: dict, temperature: float):
    """Mean over the answers' positions of KL(teacher || student) on the teacher's top-k, rows looked up in `table`
    by their tokens (right padding); rows the teacher did not score add nothing."""
    import torch

    total, count = logits.new_zeros(()), 0
    for row in range(logits.shape[0]):
        length = int(attention_mask[row].sum()) if attention_mask is not None else logits.shape[1]
        entry = table.get(tuple(input_ids[row, :length].tolist()))
        if entry is None:
            continue
        top_ids, teacher_logp = (x.to(logits.device) for x in entry)
        positions = (labels[row, 1:length] != IGNORE_INDEX).nonzero().squeeze(-1)
        # both distributions over the teacher's top-k ids, each renormalised there (a student that agrees scores 0)
        student = torch.log_softmax(logits[row, positions].float().gather(-1, top_ids.long()) / temperature, dim=-1)
        teacher = teacher_logp.float()
        total = total + (teacher.exp() * (teacher - student)).sum()
        count += len(positions)
    return total / max(1, count)


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    from trl import SFTTrainer

    from tuneforge.methods.gkd import load_teacher
    from tuneforge.methods.sft import build_trainer as sft_trainer

    recipe, d = ctx.recipe, ctx.recipe.distill
    teacher, teacher_tokenizer = load_teacher(recipe.model_copy(update={"rl": recipe.rl.model_copy(
        update={"teacher": d.teacher})}), ctx.device)
    if teacher_tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise RecipeError([f"`distill.teacher`: {d.teacher} has another tokenizer ({len(teacher_tokenizer)} tokens, the "
                           f"student {len(ctx.tokenizer)}); distillation compares next-token distributions, so the "
                           f"teacher must share the student's tokenizer (e.g. a larger model of the same family)"])
    ctx.console.print(f"[bold]teacher[/] {d.teacher}: scoring {len(ctx.data.train)} training examples once "
                      f"(top-{d.top_k} at temperature {d.temperature:g})")
    table = teacher_top_k(teacher, ctx.data.train + ctx.data.eval, k=d.top_k, temperature=d.temperature,
                          batch_size=recipe.eval.batch_size)
    stored = sum(ids.numel() * 4 + logp.numel() * 2 for ids, logp in table.values())
    teacher_scores = None
    if ctx.data.eval_examples:
        from tuneforge.scores import score_model

        teacher_scores = score_model(teacher, ctx, ctx.data.eval_examples, label="teacher")
        ctx.run.write_json("eval/teacher.json", teacher_scores)
    del teacher

    class DistillTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if not model.training:  # the held-out loss stays the answers' cross-entropy, comparable with the base's
                return (ce, outputs) if return_outputs else ce
            kl = sparse_kl(outputs.logits, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"], table,
                           d.temperature)
            loss = d.alpha * d.temperature ** 2 * kl + (1 - d.alpha) * ce
            self._distill_logs = {"distill_kl": float(kl.detach()), "distill_ce": float(ce.detach())}
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and getattr(self, "_distill_logs", None):
                logs = {**logs, **self._distill_logs}
            return super().log(logs, *args, **kwargs)

    trainer = sft_trainer(ctx, model, train_dataset, eval_dataset, callbacks, trainer_cls=DistillTrainer)
    trainer.distill_summary = {"teacher": d.teacher, "top_k": d.top_k, "temperature": d.temperature, "alpha": d.alpha,
                               "positions": sum(len(ids) for ids, _ in table.values()), "stored_bytes": stored,
                               "teacher_metrics": (teacher_scores or {}).get("metrics")}
    ctx.run.write_json("eval/distill.json", trainer.distill_summary)
    return trainer


register(Method(
    name="distill", family="supervised", data="conversations",
    summary="offline distillation: KL to a teacher's top-k (scored once) + cross-entropy",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer, reads=("distill",),
    refuses=(NO_PACKING, Refusal("distill.teacher", lambda recipe: not recipe.distill.teacher,
                                 "method distill needs a teacher: set distill.teacher (a model name, folder or run)")),
    seeds="seed 000 step 13", hooks={"scores": "generation", "few_shot": True}))
