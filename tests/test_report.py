"""The run report renders from a synthetic run directory (no training): expected files, embedded images, the
three baselines, forgetting, and the comparison of runs."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from tuneforge.errors import RunDirError
from tuneforge.evaluate.forgetting import compare
from tuneforge.report import compare_runs, load_run, write_comparison, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _probe(accuracy: float, instructions: float) -> dict:
    items = [{"id": f"mc-{i:02d}", "subject": "science" if i < 20 else "history", "correct": i < accuracy * 0.4}
             for i in range(40)]
    return {"accuracy": accuracy, "accuracy_norm": accuracy - 5, "n": 40,
            "per_subject": {"science": min(100.0, accuracy + 10), "history": max(0.0, accuracy - 10)},
            "items": items, "instructions": {"pass_rate": instructions, "n": 8, "items": []}}


def make_run(path: Path, *, name: str = "demo", steps: int = 40, lr: float = 2e-4, forgetting_drop: float = 10.0,
             status: str = "completed") -> Path:
    """A run directory with every file a finished run writes, filled with plausible synthetic numbers."""
    (path / "eval").mkdir(parents=True)
    rows = [{"step": 0, "epoch": 0, "time": 0.0, "eval_loss": 2.0}]
    for step in range(1, steps + 1):
        rows.append({"step": step, "epoch": step / steps, "time": step * 1.5, "loss": 2.0 * math.exp(-step / 15) + 0.3,
                     "learning_rate": lr * min(1.0, step / 4) * (0.5 + 0.5 * math.cos(math.pi * step / steps)),
                     "grad_norm": 1.0 / math.sqrt(step), "tokens_per_s": 1800 + 20 * (step % 5),
                     "mean_token_accuracy": 0.5 + 0.4 * step / steps, "tokens_seen": 1000 * step})
        if step % 10 == 0:
            rows.append({"step": step, "eval_loss": 1.6 * math.exp(-step / 20) + 0.4, "eval_mean_token_accuracy": 0.5 + 0.01 * step,
                         "eval_runtime": 1.2})
    rows.append({"step": steps, "train_runtime": 60.0, "train_loss": 0.8})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "loss"', encoding="utf-8")
    samples = [{"prompt": f"<|im_start|>user\nExtract the order from text {i} <b>&amp;</b><|im_end|>\n<|im_start|>assistant\n",
                "reference": '{"name": "Ana", "quantity": %d}' % i, "prediction": "p"} for i in range(8)]
    evals = {"baseline.json": {"exact_match": 5.0, "json_valid": 20.0},
             "few_shot.json": {"exact_match": 30.0, "json_valid": 70.0},
             "tuned.json": {"exact_match": 85.0, "json_valid": 100.0}}
    for file, metrics in evals.items():
        result = {"metrics": metrics, "n": 8,
                  "samples": [dict(s, prediction=f"{file} answer {i}") for i, s in enumerate(samples)]}
        if file == "few_shot.json":
            result["shots"] = 3
        (path / "eval" / file).write_text(json.dumps(result), encoding="utf-8")
    summary = {"train_seconds": 61.2, "steps": steps, "eval_loss": {"base": 2.0, "few_shot": 1.4, "tuned": 0.45},
               "metrics": {"exact_match": {"base": 5.0, "few_shot": 30.0, "tuned": 85.0}}, "n_eval": 8,
               "peak_memory_gb": 3.2}
    (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    before, after = _probe(60.0, 75.0), _probe(60.0 - forgetting_drop, 75.0)
    (path / "eval" / "forgetting.json").write_text(json.dumps({"before": before, "after": after,
                                                                "comparison": compare(before, after)}), encoding="utf-8")
    (path / "eval" / "contamination.json").write_text(json.dumps({
        "train": 400, "eval": 60, "contaminated": True, "eval_hashes": [],
        "exact": {"count": 1, "percent": 1.7, "examples": [{"eval_index": 3, "where": "eval.jsonl:4", "text": "Extract <this>"}]},
        "prompt": {"count": 2, "percent": 3.3, "examples": []}, "answer": {"count": 5, "percent": 8.3, "examples": []}}))
    (path / "eval" / "early_stopping.json").write_text(json.dumps({
        "metric": "eval_loss", "patience": 3, "min_delta": 0.01, "stopped_early": True, "stopped_at_step": steps,
        "best_step": steps - 10, "best_value": 0.45, "best_checkpoint": None, "evaluations": []}))
    (path / "eval" / "judge.json").write_text(json.dumps({
        "judge": "http://localhost:8000/v1 (some-model)",
        "pairwise": {"names": ["base", "tuned"], "n": 8, "wins": {"base": 1, "tuned": 5, "tie": 2},
                     "win_rate": {"base": 25.0, "tuned": 75.0}, "position_consistency": 0.75, "first_position_rate": 0.6,
                     "longer_preferred_rate": 0.5, "position_bias": True, "length_bias": False, "unparsed": 0, "items": []},
        "grades": {"tuned": {"mean_score": 7.5, "length_correlation": 0.1, "unparsed": 0}}}))
    (path / "recipe.yaml").write_text(f"name: {name}\nmodel:\n  name: embedded:smollm2-135m-instruct\nmethod: sft\n"
                                      f"adapter:\n  type: lora\n  r: 16\ntrain:\n  lr: {lr}\n  max_steps: {steps}\n",
                                      encoding="utf-8")
    (path / "environment.json").write_text(json.dumps({"python": "3.11.7", "device": "cpu (2 threads)",
                                                       "versions": {"torch": "2.13.0", "bitsandbytes": None}}))
    (path / "status.json").write_text(json.dumps({"state": status, "started": 1_700_000_000.0}))
    (path / "data_stats.json").write_text(json.dumps({"format": "messages", "train_examples": 400, "eval_examples": 60}))
    return path


def test_report_has_expected_files_and_embedded_images(tmp_path):
    run = make_run(tmp_path / "demo")
    target = write_report(run)
    assert target == run / "report.html"
    plots = sorted(p.name for p in (run / "plots").iterdir())
    assert plots == ["baselines.png", "forgetting.png", "grad_norm.png", "learning_rate.png", "loss.png",
                     "metrics.png", "tokens_per_s.png"]
    for png in (run / "plots").iterdir():
        assert png.read_bytes().startswith(PNG_MAGIC)
    page = target.read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 7
    assert all(base64.b64decode(image).startswith(PNG_MAGIC) for image in images)
    # self-contained: no external resources of any kind
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page and "<link" not in page


def test_report_content(tmp_path):
    page = write_report(make_run(tmp_path / "demo")).read_text(encoding="utf-8")
    for text in ("base zero-shot", "base few-shot (prompt only)", "tuned", "exact_match", "json_valid",
                 "held-out loss", "perplexity", "possible forgetting", "multiple choice",
                 "overlap found", "position bias", "stopped at step 40", "Resolved recipe", "embedded:smollm2-135m-instruct",
                 "not installed", "Samples"):
        assert text in page, text
    assert "+80.0" in page and "+55.0" in page  # tuned - base and tuned - few-shot on exact_match
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in page and "<b>&amp;</b>" not in page  # sample text is escaped


def test_report_of_a_run_without_eval_or_summary(tmp_path):
    run = tmp_path / "crashed"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "failed", "error": "RuntimeError: CUDA out of memory"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5, "learning_rate": 1e-4}) + "\n")
    page = write_report(run).read_text(encoding="utf-8")
    assert "failed" in page and "CUDA out of memory" in page
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["learning_rate.png", "loss.png"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="not a tuneforge run directory"):
        write_report(tmp_path)


def test_load_run_skips_a_truncated_last_line(tmp_path):
    data = load_run(make_run(tmp_path / "demo"))
    assert data.rows[-1]["step"] == 40 and data.baseline_table()["exact_match"] == {"base": 5.0, "few_shot": 30.0, "tuned": 85.0}


def test_compare_runs_table_and_html(tmp_path):
    from rich.console import Console

    a = make_run(tmp_path / "a", name="lr-high", lr=1e-3)
    b = make_run(tmp_path / "b", name="lr-low", lr=1e-4, forgetting_drop=0.0)
    table = compare_runs([a, b])
    assert [c.header for c in table.columns] == ["", "lr-high", "lr-low"]
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "0.001" in text and "0.0001" in text and "FLAGGED" in text and "85.0 (+80.0)" in text
    page = write_comparison([a, b], tmp_path / "compare.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2 and "lr-high" in page and "lr-low" in page
