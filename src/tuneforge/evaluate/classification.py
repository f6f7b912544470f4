"""Classification scores (method: classify): accuracy, macro-F1, per-class precision/recall/F1 and the confusion
matrix of predicted labels against the held-out labels; predictions by a classification head; and the baselines a
tuned classifier is compared with -- the majority class, and (decoders) the base model prompted zero- and few-shot,
which picks the label whose tokens it finds most likely after the prompt (mean log-probability per label token, so
labels of different lengths compete fairly; no free text to parse).

Every result has the shape evaluate/scoring.py gives generation results ({"metrics", "n", "samples"} with a 0/1
per-example `accuracy` score), so the run's baseline table, its paired-bootstrap intervals and the report read it
unchanged; it adds `per_class`, `confusion` and `labels`.
"""

from __future__ import annotations

from collections import Counter


def classification_metrics(gold: list[int], predicted: list[int], labels: list[str], *, texts: list[str] | None = None,
                           samples: int | None = None) -> dict:
    """{"metrics": {"accuracy", "macro_f1"} in %, "n", "per_class": {label: {precision, recall, f1, support}} in %,
    "confusion": rows = true label, columns = predicted (label order), "samples": per-example 0/1 accuracy}."""
    k, n = len(labels), len(gold)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted_i = sum(confusion[r][i] for r in range(k))
        support = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(100 * precision, 2), "recall": round(100 * recall, 2),
                           "f1": round(100 * f1, 2), "support": support}
        if support:  # macro-F1 over the classes present in the held-out set
            f1s.append(f1)
    correct = [1.0 if g == p else 0.0 for g, p in zip(gold, predicted)]
    rows = [{"scores": {"accuracy": c}, "label": labels[g], "predicted": labels[p],
             **({"text": texts[i][:300]} if texts else {})} for i, (g, p, c) in enumerate(zip(gold, predicted, correct))]
    return {"metrics": {"accuracy": round(100 * sum(correct) / max(1, n), 2),
                        "macro_f1": round(100 * sum(f1s) / max(1, len(f1s)), 2)},
            "n": n, "labels": list(labels), "per_class": per_class, "confusion": confusion,
            "samples": rows if samples is None else rows[:samples]}


def macro_f1_of(pairs: list[tuple[str, str]]) -> float:
    """Macro-F1 in % of (gold label, predicted label) pairs, over the gold labels present (as classification_metrics)."""
    f1s = []
    for name in sorted({gold for gold, _ in pairs}):
        tp = sum(1 for g, p in pairs if g == name and p == name)
        predicted, support = sum(1 for _, p in pairs if p == name), sum(1 for g, _ in pairs if g == name)
        precision, recall = (tp / predicted if predicted else 0.0), tp / support
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return 100 * sum(f1s) / max(1, len(f1s))


def label_pairs(result: dict | None) -> list[tuple[str, str]] | None:
    """(gold, predicted) per held-out example of a classification result, or None (not one, or samples cut)."""
    samples = (result or {}).get("samples") or []
    if not samples or len(samples) != (result or {}).get("n") or any("predicted" not in s for s in samples):
        return None
    return [(s["label"], s["predicted"]) for s in samples]


def majority_baseline(train_labels: list[int], gold: list[int], labels: list[str]) -> dict:
    """Always the training data's most frequent label (a tie goes to the first in label order)."""
    counts = Counter(train_labels)
    most = max(sorted(counts), key=lambda label: counts[label])
    result = classification_metrics(gold, [most] * len(gold), labels)
    result["label"] = labels[most]
    return result


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def head_predictions(model, items, pad_id: int, *, batch_size: int = 16) -> list[int]:
    """argmax of the classification head for each example (right-padded batches, no gradient)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        with torch.no_grad():
            for chunk in _batches(items, batch_size):
                width = max(len(e.input_ids) for e in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                types = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, e in enumerate(chunk):
                    ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                    mask[row, : len(e.input_ids)] = 1
                    if e.token_type_ids is not None:
                        types[row, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
                extra = {"token_type_ids": types.to(device)} if any(e.token_type_ids for e in chunk) else {}
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
                out += logits.float().argmax(-1).tolist()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The prompted base model (decoders): zero- and few-shot


def _question(example, labels: list[str]) -> str:
    text = example.text if example.pair is None else f"{example.text}\nSecond text: {example.pair}"
    return f"Classify the text as one of: {', '.join(labels)}.\n\nText: {text}\n\nAnswer with the label only."


def prompt_prefix(tokenizer, example, labels: list[str], shots: list) -> str:
    """The prompt the base model continues with a label: shots as earlier turns (chat template), or as text."""
    if tokenizer.chat_template:
        from tuneforge.data.template import render_chat

        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": _question(shot, labels)},
                         {"role": "assistant", "content": labels[shot.label]}]
        messages.append({"role": "user", "content": _question(example, labels)})
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    solved = "".join(f"{_question(s, labels)}\nLabel: {labels[s.label]}\n\n" for s in shots)
    return f"{solved}{_question(example, labels)}\nLabel: "


def pick_shots(train, k: int, seed: int) -> list:
    """k training examples, one per label first (seeded), so every label is shown when k allows."""
    import random

    rng = random.Random(seed)
    by_label: dict[int, list] = {}
    for e in train:
        by_label.setdefault(e.label, []).append(e)
    shots = [rng.choice(by_label[label]) for label in sorted(by_label)][:k]
    rest = [e for e in train if all(e is not s for s in shots)]
    shots += rng.sample(rest, min(max(0, k - len(shots)), len(rest)))
    rng.shuffle(shots)
    return shots


def prompted_predictions(model, tokenizer, examples, labels: list[str], *, shots: list | None = None,
                         batch_size: int = 16, max_prompt_tokens: int = 1024) -> list[int]:
    """For each example, the label whose tokens have the highest mean log-probability after the prompt."""
    import torch

    device = next(model.parameters()).device
    label_ids = [tokenizer(name, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for name in labels]
    rows, owners = [], []
    for i, example in enumerate(examples):
        prompt = tokenizer(prompt_prefix(tokenizer, example, labels, shots or []),
                           add_special_tokens=not tokenizer.chat_template)["input_ids"][-max_prompt_tokens:]
        for j, ids in enumerate(label_ids):
            rows.append((prompt, ids))
            owners.append((i, j))
    scores = [[float("-inf")] * len(labels) for _ in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(p) + len(c) for p, c in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, (p, c) in enumerate(chunk):
                    ids[r, : len(p) + len(c)] = torch.tensor(p + c)
                    mask[r, : len(p) + len(c)] = 1
                logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
                for r, (p, c) in enumerate(chunk):
                    positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=logp.device)
                    target = torch.tensor(c, device=logp.device)
                    value = logp[r, positions, target].mean().item()
                    i, j = owners[start + r]
                    scores[i][j] = value
    finally:
        model.train(was_training)
    return [max(range(len(labels)), key=lambda j: row[j]) for row in scores]


# ---------------------------------------------------------------------------------------------------------------
# The run's scorer (scores.py's interface: check, before, start, trained, after)


class ClassificationScorer:
    """Held-out classification scores before and after training, with the majority-class and prompted baselines;
    each result written under eval/ as it is made (a resumed run keeps its "before" numbers)."""

    table = True

    def __init__(self, ctx):
        self.ctx = ctx
        self.results: dict = {}

    @property
    def held_out(self):
        return self.ctx.data.eval[: self.ctx.recipe.eval.max_examples or None]

    def check(self) -> None:
        from tuneforge.errors import DataError

        if not self.ctx.data.eval:
            raise DataError("no held-out examples to measure the classifier on", where="data.eval",
                            fix="give data.eval, or more examples so data.eval_fraction holds some out")

    def _pad(self) -> int:
        pad = self.ctx.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def _head(self, model) -> dict:
        items, labels = self.held_out, self.ctx.data.labels
        predicted = head_predictions(model, items, self._pad(), batch_size=self.ctx.recipe.eval.batch_size)
        return classification_metrics([e.label for e in items], predicted, labels, texts=[e.text for e in items])

    def _saved(self, name: str, resumed: bool, make) -> dict | None:
        result = self.ctx.run.read_json(f"eval/{name}.json") if resumed else None
        if result is None:
            result = make()
            if result is not None:
                self.ctx.run.write_json(f"eval/{name}.json", result)
        return result

    def before(self, model, *, resumed: bool) -> None:
        from tuneforge.methods.classify import is_encoder

        ctx, recipe, items = self.ctx, self.ctx.recipe, self.held_out
        labels = ctx.data.labels
        self.encoder = is_encoder(model.config)
        gold = [e.label for e in items]
        self.results["majority"] = self._saved("majority", resumed, lambda: majority_baseline(
            [e.label for e in ctx.data.train], gold, labels))
        self.results["untrained_head"] = self._saved("untrained_head", resumed, lambda: self._head(model))
        if self.encoder or not recipe.eval.baseline:
            self.results["base"] = self.results["untrained_head"]
            self.ctx.run.write_json("eval/baseline.json", self.results["base"])
        else:
            prompted = {}

            def prompted_result(shots):
                if "model" not in prompted:
                    prompted["model"] = self._causal_model()
                predicted = prompted_predictions(prompted["model"], ctx.tokenizer, items, labels, shots=shots,
                                                 batch_size=recipe.eval.batch_size)
                return classification_metrics(gold, predicted, labels, texts=[e.text for e in items])

            self.results["base"] = self._saved("baseline", resumed, lambda: prompted_result([]))
            if recipe.eval.few_shot:
                shots = pick_shots(ctx.data.train, recipe.eval.few_shot, recipe.train.seed)
                self.results["few_shot"] = self._saved("few_shot", resumed, lambda: dict(
                    prompted_result(shots), shots=len(shots)))
            prompted.clear()
        for key in ("majority", "untrained_head", "base", "few_shot"):
            if self.results.get(key):
                shown = ", ".join(f"{k} {v:.1f}" for k, v in self.results[key]["metrics"].items())
                ctx.console.print(f"[bold]{key.replace('_', ' ')}[/] on {len(items)} held-out examples: {shown}")

    def _causal_model(self):
        """The base model as a causal LM, for the prompted baselines (freed after them)."""
        from tuneforge.models import load_base_model

        recipe = self.ctx.recipe
        return load_base_model(recipe.model, quant=recipe.quant if recipe.adapter.type == "qlora" else None,
                               device=self.ctx.device)

    def start(self, model) -> None:
        pass

    def trained(self, trainer) -> None:
        pass

    def after(self, model, trainer) -> dict:
        from tuneforge.evaluate.baselines import baseline_table, metric_deltas

        ctx = self.ctx
        tuned = self._head(trainer.model)
        ctx.run.write_json("eval/tuned.json", tuned)
        results = {"base": self.results.get("base"), "few_shot": self.results.get("few_shot"), "tuned": tuned}
        metrics = baseline_table(results)
        for name, deltas in metric_deltas(results).items():
            metrics[name].update(deltas)
        for name in metrics:
            for key in ("majority", "untrained_head"):
                metrics[name][key] = self.results[key]["metrics"][name]
            if not self.encoder and ctx.recipe.eval.baseline:
                metrics[name]["zero_shot"] = self.results["base"]["metrics"][name]
        if self.encoder:
            prompted = "does not apply: an encoder is not a generative model, so it cannot be prompted"
        elif ctx.recipe.eval.baseline:
            prompted = (f"the base model prompted zero-shot (base) and with {ctx.recipe.eval.few_shot} training "
                        f"examples (few_shot): the label whose tokens it finds likeliest")
        else:
            prompted = "off (eval.baseline: false)"
        prompted_base = not self.encoder and ctx.recipe.eval.baseline
        summary = {"labels": ctx.data.labels, "model_kind": "encoder" if self.encoder else "decoder",
                   "base_is": "the base model prompted zero-shot" if prompted_base else
                   "the untrained head (the base model with its new head, before training)",
                   "prompted_baseline": prompted, "majority_label": self.results["majority"]["label"],
                   "train_counts": getattr(ctx.data, "counts", {}), "conflicting_labels": getattr(ctx.data, "conflicts", 0),
                   "class_weights": getattr(trainer, "classify_weights", None),
                   "per_class": tuned["per_class"], "confusion": tuned["confusion"],
                   "confusion_base": (self.results.get("base") or {}).get("confusion")}
        ctx.run.write_json("eval/classification.json", summary)
        ctx.console.print(f"[bold]tuned[/] on {tuned['n']} held-out examples: accuracy {tuned['metrics']['accuracy']:.1f}, "
                          f"macro-F1 {tuned['metrics']['macro_f1']:.1f} (majority class "
                          f"{self.results['majority']['metrics']['accuracy']:.1f})")
        return {"metrics": metrics, "n_eval": tuned["n"], "classification": summary}
