"""The blind A/B sheet: a run's held-out prompts with the base and the tuned answer, each item's order random and
the sides hidden, as a self-contained HTML page (radio buttons A / B / tie, a button that downloads the ratings as
CSV; works offline, no network, nothing outside the file) and as a CSV to fill in a spreadsheet.

Which side is the tuned model's is written only to the run's eval/rate_key.json (item id -> sample index and side),
never to the sheet: hand out the sheet, keep the key.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
from pathlib import Path

from tuneforge.errors import RunDirError

KEY_FILE = "eval/rate_key.json"
SHEET_NAME = "rating_sheet"
SHEET_COLUMNS = ("id", "question", "reference", "answer_a", "answer_b", "rating", "comment")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet would run such a cell as a formula


def load_pairs(run_path: str | Path) -> tuple[object, list[dict]]:
    """(the run, [{"index", "question", "reference", "base", "tuned"}]) from a finished run's eval/baseline.json and
    eval/tuned.json: the base and the tuned model's answers to the same held-out prompts."""
    from tuneforge.evaluate.judge import judge_inputs
    from tuneforge.run import open_run

    run = open_run(run_path)
    baseline, tuned = run.read_json("eval/baseline.json"), run.read_json("eval/tuned.json")
    if not baseline or not tuned or not baseline.get("samples") or not tuned.get("samples"):
        raise RunDirError(f"run {run.path} has no base and tuned answers to rate (eval/baseline.json and eval/tuned.json "
                          "with samples)", fix="rate a run of a method scored by generation (sft, dft, preference "
                          "methods) trained with eval.baseline: true")
    for i, (b, t) in enumerate(zip(baseline["samples"], tuned["samples"])):
        if (b.get("question") or b.get("prompt")) != (t.get("question") or t.get("prompt")):
            raise RunDirError(f"eval/baseline.json and eval/tuned.json of {run.path} differ at sample {i}: they are not "
                              "answers to the same prompts", fix="rate a run whose eval/ files the same training wrote")
    prompts, base, tuned_answers, references = judge_inputs(baseline, tuned)
    return run, [{"index": i, "question": q, "reference": r, "base": b, "tuned": t}
                 for i, (q, b, t, r) in enumerate(zip(prompts, base, tuned_answers, references))]


def blind(pairs: list[dict], *, seed: int) -> tuple[list[dict], dict]:
    """The sheet's rows (random order, random side for the tuned answer) and the key: {id: {"index", "tuned": A|B}}."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    rows, key = [], {}
    width = max(3, len(str(len(pairs))))
    for k, i in enumerate(order, 1):
        pair, side = pairs[i], rng.choice("AB")
        item_id = f"item-{k:0{width}d}"
        first, second = (pair["tuned"], pair["base"]) if side == "A" else (pair["base"], pair["tuned"])
        rows.append({"id": item_id, "question": pair["question"], "reference": pair["reference"], "answer_a": first,
                     "answer_b": second})
        key[item_id] = {"index": pair["index"], "tuned": side}
    return rows, key


def make_sheet(run_path: str | Path, *, output: str | Path | None = None, seed: int = 0,
               max_examples: int | None = None) -> dict:
    """Write the sheet (rating_sheet.html and rating_sheet.csv, in `output` or the run's eval/) and the key.
    -> {"html", "csv", "key", "n"}. A key already there for another sheet (other seed or size) is not replaced:
    ratings of that sheet could no longer be read back."""
    from tuneforge.run import write_atomic

    run, pairs = load_pairs(run_path)
    pairs = pairs[: max_examples or None]
    rows, key = blind(pairs, seed=seed)
    document = {"seed": seed, "n": len(rows), "items": key}
    existing = run.read_json(KEY_FILE)
    if existing and existing.get("items") != key:
        raise RunDirError(f"{run.path / KEY_FILE} holds the key of another rating sheet (seed {existing.get('seed')}, "
                          f"{existing.get('n')} items); its ratings need that key",
                          fix=f"make the same sheet again with --seed {existing.get('seed')} --max-examples "
                              f"{existing.get('n')}, or delete {KEY_FILE} once its ratings are imported")
    folder = Path(output) if output is not None else run.path / "eval"
    token = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]
    write_atomic(folder / f"{SHEET_NAME}.html", sheet_html(rows, token=token))
    write_atomic(folder / f"{SHEET_NAME}.csv", sheet_csv(rows))
    run.write_json(KEY_FILE, document)
    return {"html": folder / f"{SHEET_NAME}.html", "csv": folder / f"{SHEET_NAME}.csv", "key": run.path / KEY_FILE,
            "n": len(rows)}


def _cell(text: str) -> str:
    """A cell of model text, kept from running as a spreadsheet formula (prefixed with ')."""
    return "'" + text if text.startswith(FORMULA_START) else text


def sheet_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(SHEET_COLUMNS)
    for row in rows:
        writer.writerow([row["id"], *(_cell(row[k]) for k in ("question", "reference", "answer_a", "answer_b")), "", ""])
    return buffer.getvalue()


STYLE = """
body { margin: 0 auto; max-width: 1100px; padding: 16px 24px 64px; color: #1d2330; background: #f6f8fb;
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
.item { background: #fff; border: 1px solid #e4e7ec; border-radius: 8px; padding: 14px 18px; margin: 16px 0; }
.item.done { border-left: 4px solid #1e8e3e; }
h2 { font-size: 14px; color: #667085; margin: 0 0 6px; }
.question, .answer, .reference { white-space: pre-wrap; overflow-wrap: anywhere; }
.reference { color: #475467; font-size: 13px; margin-top: 6px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin: 10px 0; }
.answer { border: 1px solid #e4e7ec; border-radius: 6px; padding: 8px 10px; background: #fcfcfd; }
.answer b { display: block; color: #2f6fdf; }
label { margin-right: 18px; cursor: pointer; } input.comment { width: 60%; }
.bar { position: sticky; top: 0; background: #f6f8fb; padding: 8px 0; border-bottom: 1px solid #e4e7ec; }
button { font-size: 15px; padding: 6px 14px; cursor: pointer; }
"""

SCRIPT = r"""
function csvCell(value) {
  var text = String(value);
  if (/^[=+\-@\t\r]/.test(text)) { text = "'" + text; }
  return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}
function toCsv(rows) {
  return rows.map(function (row) { return row.map(csvCell).join(","); }).join("\r\n") + "\r\n";
}
function collect() {
  var rows = [["id", "rating", "comment"]];
  document.querySelectorAll(".item").forEach(function (item) {
    var picked = item.querySelector("input[type=radio]:checked");
    rows.push([item.dataset.id, picked ? picked.value : "", item.querySelector("input.comment").value]);
  });
  return rows;
}
function refresh() {
  var rows = collect().slice(1), done = rows.filter(function (r) { return r[1]; }).length;
  document.getElementById("progress").textContent = done + " of " + rows.length + " rated";
  document.querySelectorAll(".item").forEach(function (item) {
    item.classList.toggle("done", !!item.querySelector("input[type=radio]:checked"));
  });
  try { localStorage.setItem(STORE, JSON.stringify(rows)); } catch (e) {}
}
function restore() {
  var saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) {}
  (saved || []).forEach(function (row) {
    var item = document.querySelector('.item[data-id="' + row[0] + '"]');
    if (!item) { return; }
    var radio = item.querySelector('input[value="' + row[1] + '"]');
    if (radio) { radio.checked = true; }
    item.querySelector("input.comment").value = row[2] || "";
  });
}
function download() {
  var blob = new Blob([toCsv(collect())], {type: "text/csv;charset=utf-8"});
  var link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "ratings.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
}
document.addEventListener("DOMContentLoaded", function () {
  restore();
  refresh();
  document.addEventListener("change", refresh);
  document.addEventListener("input", refresh);
  document.querySelectorAll("button.download").forEach(function (b) { b.addEventListener("click", download); });
});
"""


def sheet_html(rows: list[dict], *, token: str) -> str:
    esc = html.escape
    items = []
    for row in rows:
        name = esc(row["id"])
        reference = (f'<div class="reference"><b>Reference answer:</b> {esc(row["reference"])}</div>'
                     if row["reference"] else "")
        choices = "".join(f'<label><input type="radio" name="{name}" value="{value}"> {label}</label>'
                          for value, label in (("A", "A is better"), ("B", "B is better"), ("tie", "tie")))
        items.append(f'<div class="item" data-id="{name}"><h2>{name}</h2><div class="question">{esc(row["question"])}'
                     f'</div>{reference}<div class="pair"><div class="answer"><b>A</b>{esc(row["answer_a"])}</div>'
                     f'<div class="answer"><b>B</b>{esc(row["answer_b"])}</div></div><div>{choices}'
                     f'<input class="comment" type="text" placeholder="comment (optional)"></div></div>')
    store = json.dumps(f"tuneforge-rate-{token}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Rating sheet ({len(rows)} items)</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
            f"<h1>Which answer is better?</h1><p>Each item shows a request and two answers, A and B, from two models. "
            f"Which model wrote which, and the order, are random and hidden. Choose the better answer (or tie) for "
            f"each item; your choices are kept in this browser as you go. When done, press <b>Download ratings</b> and "
            f"send back the ratings.csv it saves.</p>"
            f'<div class="bar"><span id="progress">0 of {len(rows)} rated</span> '
            f'<button class="download" type="button">Download ratings (CSV)</button></div>'
            f'{"".join(items)}<p><button class="download" type="button">Download ratings (CSV)</button></p>'
            f"<script>var STORE = {store};{SCRIPT}</script></body></html>\n")
