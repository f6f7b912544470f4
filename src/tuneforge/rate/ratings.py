"""People's ratings read back: the filled CSV (the one the HTML sheet downloads, or rating_sheet.csv filled in a
spreadsheet) checked line by line, un-blinded with the run's eval/rate_key.json, and summarised in
eval/human_ratings.json: the tuned model's win rate with its Wilson interval, and, when the run has eval/judge.json,
how well the LLM judge agrees with the people (the share of the judge's decided verdicts they share, Cohen's kappa).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tuneforge.errors import DataError, RunDirError

RATINGS_FILE = "eval/human_ratings.json"
# what a person may write in the rating column (any case); empty = not rated
VALUES = {"a": "A", "b": "B", "tie": "tie", "t": "tie", "c": "tie", "=": "tie", "same": "tie", "equal": "tie"}
VERDICTS = ("base", "tuned", "tie")


def read_ratings(path: str | Path, known_ids) -> list[dict]:
    """[{"id", "rating": A|B|tie|None, "comment", "line"}] from a filled sheet; unknown or repeated ids and values
    other than A / B / tie are errors that name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"ratings file {path} not found", where=str(path), fix="give the CSV the sheet downloaded") from None
    except UnicodeDecodeError:
        raise DataError("the ratings file is not UTF-8 text", where=str(path),
                        fix="save it from the spreadsheet as CSV UTF-8") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    header, start = None, 1
    rows, seen = [], {}
    try:
        for record in reader:
            line, start = start, reader.line_num + 1  # a quoted cell may span lines: a record is named by its first
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in record]
                if "id" not in header or "rating" not in header:
                    raise DataError(f"the header has no `id` and `rating` columns (found: {', '.join(header)})",
                                    where=f"{path}:{line}", fix="use the CSV the sheet's Download button saves, or "
                                    "rating_sheet.csv with its rating column filled in")
                continue
            cells = dict(zip(header, record))
            item_id, raw = cells.get("id", "").strip(), cells.get("rating", "").strip()
            if item_id not in known_ids:
                raise DataError(f"unknown item id {item_id!r}", where=f"{path}:{line}",
                                fix="ids are those of this run's sheet (item-001, ...): was the sheet made for another "
                                    "run, or remade with another --seed / --max-examples?")
            if item_id in seen:
                raise DataError(f"item {item_id} is rated twice (first at line {seen[item_id]})", where=f"{path}:{line}",
                                fix="keep one row per item")
            if raw and raw.lower() not in VALUES:
                raise DataError(f"rating {raw!r} of {item_id} is not A, B or tie", where=f"{path}:{line}",
                                fix="write A (the left/first answer is better), B, or tie; leave it empty to skip")
            seen[item_id] = line
            rows.append({"id": item_id, "rating": VALUES[raw.lower()] if raw else None,
                         "comment": cells.get("comment", "").strip(), "line": line})
    except csv.Error as exc:
        raise DataError(f"not readable as CSV: {exc}", where=f"{path}:{start}", fix="save the sheet as CSV") from None
    if header is None:
        raise DataError("the ratings file is empty", where=str(path), fix="give the CSV the sheet downloaded")
    return rows


def cohen_kappa(pairs: list[tuple[str, str]], labels=VERDICTS) -> float | None:
    """Cohen's kappa of two raters' labels on the same items; None when undefined (no items, or chance agreement 1)."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    chance = sum((sum(a == k for a, _ in pairs) / n) * (sum(b == k for _, b in pairs) / n) for k in labels)
    return None if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def judge_agreement(people: list[dict], judge_items: list[dict]) -> dict:
    """The judge's verdicts (eval/judge.json pairwise items, each with its sample "index") against the people's, on
    the items both gave. -> {"n", "judge_decided", "agreement" (share of the judge's decided verdicts -- base or
    tuned -- that the people gave too), "agreement_ci95" (Wilson), "kappa" (Cohen, over base / tuned / tie),
    "confusion": {judge verdict: {people's verdict: count}}}"""
    from tuneforge.evaluate.intervals import wilson

    judged = {item.get("index", k): item["winner"] for k, item in enumerate(judge_items)}
    pairs = [(judged[p["index"]], p["winner"]) for p in people if p["index"] in judged]
    decided = [(j, h) for j, h in pairs if j != "tie"]
    agreed = sum(j == h for j, h in decided)
    return {"n": len(pairs), "judge_decided": len(decided),
            "agreement": agreed / len(decided) if decided else None, "agreement_ci95": wilson(agreed, len(decided)),
            "kappa": cohen_kappa(pairs),
            "confusion": {j: {h: sum(1 for a, b in pairs if (a, b) == (j, h)) for h in VERDICTS} for j in VERDICTS}}


def import_ratings(run_path: str | Path, file: str | Path) -> dict:
    """Read a filled sheet back into the run: -> (and writes eval/human_ratings.json) {"file", "items_on_sheet",
    "rated", "unrated", "win_rate": judge.win_rate(...) of the tuned model, "judge_agreement" (when eval/judge.json
    has pairwise verdicts), "items": [{"id", "index", "rating", "winner", "comment"}]}"""
    from tuneforge.evaluate.judge import win_rate
    from tuneforge.rate.sheet import KEY_FILE
    from tuneforge.run import open_run

    run = open_run(run_path)
    key = run.read_json(KEY_FILE)
    if not key or not key.get("items"):
        raise RunDirError(f"run {run.path} has no rating sheet key ({KEY_FILE})",
                          fix=f"make the sheet first: tuneforge rate {run.path}")
    rows = read_ratings(file, key["items"])
    items = []
    for row in rows:
        if row["rating"] is None:
            continue
        entry = key["items"][row["id"]]
        winner = "tie" if row["rating"] == "tie" else ("tuned" if row["rating"] == entry["tuned"] else "base")
        items.append({"id": row["id"], "index": entry["index"], "rating": row["rating"], "winner": winner,
                      "comment": row["comment"]})
    if not items:
        raise DataError("no ratings: every rating cell is empty", where=str(file),
                        fix="choose A, B or tie for the items (in the HTML sheet, or the rating column of the CSV)")
    count = {v: sum(1 for i in items if i["winner"] == v) for v in VERDICTS}
    result = {"file": str(file), "items_on_sheet": len(key["items"]), "rated": len(items),
              "unrated": len(key["items"]) - len(items),
              "win_rate": win_rate(count["tuned"], count["tie"], count["base"])}
    judge = run.read_json("eval/judge.json") or {}
    if (judge.get("pairwise") or {}).get("items"):
        result["judge_agreement"] = judge_agreement(items, judge["pairwise"]["items"])
    result["items"] = sorted(items, key=lambda i: i["index"])
    run.write_json(RATINGS_FILE, result)
    return result


def describe(result: dict) -> list[str]:
    """Terminal lines for an import."""
    rate = result["win_rate"]
    lines = [f"{result['rated']} of {result['items_on_sheet']} items rated: tuned preferred {rate['wins']}, base "
             f"{rate['losses']}, tie {rate['ties']}"]
    if rate["decided_rate"] is not None:
        low, high = rate["ci95"]
        lines.append(f"tuned win rate {rate['decided_rate']:.1f}% of decided items, 95% CI [{low:.1f}, {high:.1f}] "
                     f"(Wilson): {rate['verdict']}; ties counted half: {rate['ties_half_rate']:.1f}%")
    agreement = result.get("judge_agreement")
    if agreement:
        if agreement["agreement"] is not None:
            lines.append(f"the judge agrees with the people on {100 * agreement['agreement']:.0f}% of its "
                         f"{agreement['judge_decided']} decided items" + (
                             f", Cohen's kappa {agreement['kappa']:.2f}" if agreement["kappa"] is not None else ""))
        else:
            lines.append("the judge decided none of the rated items (all ties): no agreement to measure")
    return lines
