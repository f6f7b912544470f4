"""method: classify -- sequence classification (seed 002's first example: an encoder with a classification head,
sentiment, accuracy per epoch, the best model kept): the base model with a fresh head of one output per label
(transformers' AutoModelForSequenceClassification: BERT-style encoders read the [CLS] token, decoders such as Llama,
Qwen or SmolLM the last real token), trained with cross-entropy on {"text", "label"} records (or text pairs,
data/labels.py) by transformers' Trainer.

Recipe keys: classify.labels (the label set and its order; default: the training data's labels, sorted),
classify.text_field / pair_field / label_field, classify.class_weights (cross-entropy weighted by inverse class
frequency, for imbalanced labels); adapter full, lora (PEFT task_type SEQ_CLS: the new head is trained fully beside
the LoRA, modules_to_save) or qlora (the backbone in 4 bits, the head in full precision); train.* as for SFT
(eval_every + early_stopping keep the best weights); eval.max_examples, eval.few_shot, eval.baseline.
Refused: packing and padding-free batches (one label per sequence), eval.metrics (classify reports its own:
accuracy, macro-F1, per-class precision/recall and the confusion matrix), model.adapter and model.add_tokens (a
classifier starts from the base model), the forgetting probe (it asks a generating model).

Scored before and after (evaluate/classification.py) on the held-out examples, beside a majority-class baseline; a
decoder's `base` is the base model prompted zero-shot and `few_shot` prompted with eval.few_shot training examples
(the label whose tokens it finds likeliest); an encoder cannot be prompted, so its `base` is the new, untrained
head (summary.json `classification.base_is` says which). The confusion matrix is plotted into report.html.
"""

from __future__ import annotations

from tuneforge.methods import Method, Refusal, register
from tuneforge.methods.common import NO_PACKING, SUPERVISED_LR_RANGE, common_arguments

DECODER_ARCHITECTURE_SUFFIX = "ForCausalLM"


def is_encoder(config) -> bool:
    """A BERT-style encoder (no prompted baseline, the head reads [CLS]) rather than a decoder."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    if any(str(a).endswith(DECODER_ARCHITECTURE_SUFFIX) for a in (getattr(config, "architectures", None) or [])):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_classifier(ctx):
    """The base model with a fresh head of len(labels) outputs (id2label / label2id saved with it)."""
    from tuneforge.models import check_weight_files, load_with_score_head, resolve_model_source

    recipe, device, labels = ctx.recipe, ctx.device, ctx.data.labels
    check_weight_files(resolve_model_source(recipe.model.name), allow_pickle=recipe.model.allow_pickle)
    model = load_with_score_head(recipe, device, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                 label2id={name: i for i, name in enumerate(labels)},
                                 fix="use an encoder (BERT, RoBERTa, MiniLM, ...) or a decoder that transformers loads "
                                     "as AutoModelForSequenceClassification")
    if ctx.tokenizer.pad_token_id is not None:
        model.config.pad_token_id = ctx.tokenizer.pad_token_id  # decoders find each row's last real token by it
    if device != "cpu" and recipe.adapter.type != "qlora":
        model.to(device)
    kind = "encoder" if is_encoder(model.config) else "decoder"
    ctx.console.print(f"[bold]classifier[/] {kind} with a new head of {len(labels)} outputs: {', '.join(labels)}")
    return model


def apply_classifier_adapter(ctx, model):
    """full: every weight trains. lora/qlora: LoRA on the backbone (adapter.*), the head trained fully (SEQ_CLS
    modules_to_save: `classifier` for encoders, `score` for decoders); the head itself gets no LoRA."""
    recipe = ctx.recipe
    if not recipe.uses_lora:
        from tuneforge.adapters import apply_adapter

        return apply_adapter(model, recipe)
    from peft import get_peft_model, prepare_model_for_kbit_training

    from tuneforge.adapters import check_target_modules, lora_config

    check_target_modules(model, recipe.adapter.target_modules)
    if recipe.adapter.type == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing is True)
    config = lora_config(recipe.adapter)
    config.task_type = "SEQ_CLS"  # PEFT keeps the head (classifier / score) out of all-linear and trains it fully
    config.ensure_weight_tying = False  # the head is tied to nothing
    return get_peft_model(model, config)


def label_datasets(ctx):
    from tuneforge.data.labels import label_dataset

    return label_dataset(ctx.data.train), (label_dataset(ctx.data.eval) if ctx.data.eval else None)


def class_weights(data) -> list[float]:
    """Inverse class frequency, n / (k x count) (1 for a label with no training example)."""
    n, k = len(data.train), len(data.labels)
    return [round(n / (k * data.counts[name]), 4) if data.counts.get(name) else 1.0 for name in data.labels]


def build_trainer(ctx, model, train_dataset, eval_dataset, callbacks):
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    recipe, tokenizer = ctx.recipe, ctx.tokenizer
    weights = class_weights(ctx.data) if recipe.classify.class_weights else None
    if weights:
        ctx.console.print("[bold]class weights[/] " + ", ".join(f"{n} {w:g}" for n, w in zip(ctx.data.labels, weights)))

    class ClassifyTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if weights is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits.float()
            loss = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor(weights, device=logits.device))
            return (loss, outputs) if return_outputs else loss

    args = TrainingArguments(**common_arguments(recipe, ctx.run, ctx.device))
    trainer = ClassifyTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                              callbacks=callbacks)
    trainer.classify_weights = weights
    return trainer


def _metrics_set(recipe) -> bool:
    return list(recipe.eval.metrics) != ["exact_match"]


# Learning rates: seed 002's encoder fine-tuning (2e-5 full, as BERT's paper), LoRA 10x (as SFT).
register(Method(
    name="classify", family="classification", data="labels",
    summary="a classification head on an encoder or decoder: cross-entropy on {text, label} (optionally class-weighted)",
    lr={"lora": 2e-4, "full": 2e-5}, lr_range=SUPERVISED_LR_RANGE, build_trainer=build_trainer, reads=("classify",),
    refuses=(NO_PACKING,
             Refusal("eval.metrics", _metrics_set, "method classify reports accuracy, macro-F1, per-class "
                     "precision/recall and a confusion matrix; generation metrics do not apply: remove eval.metrics"),
             Refusal("model.adapter", lambda recipe: bool(recipe.model.adapter), "method classify puts a new head on "
                     "the base model; start from a trained model with model.name (a merged model folder) instead"),
             Refusal("model.add_tokens", lambda recipe: bool(recipe.model.add_tokens or recipe.model.add_special_tokens),
                     "method classify does not grow the vocabulary; remove model.add_tokens / add_special_tokens"),
             Refusal("adapter.type", lambda recipe: recipe.adapter.type not in ("full", "none", "lora", "qlora"),
                     "method classify trains full, lora or qlora (the head beside the LoRA); set adapter.type to one "
                     "of those"),
             Refusal("eval.forgetting_every", lambda recipe: bool(recipe.eval.forgetting_every),
                     "the general-ability probe asks a generating model; a classifier has no answers to probe: remove "
                     "eval.forgetting_every")),
    seeds="seed 002 (first example)",
    hooks={"scores": "classification", "load_model": load_classifier, "adapter": apply_classifier_adapter,
           "datasets": label_datasets}))
