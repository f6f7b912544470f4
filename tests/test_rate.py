"""tuneforge rate: the blind sheet of a (fake, finished) run, filled in as people would, read back and checked
against numbers worked out by hand; bad sheets give located errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tuneforge.errors import DataError, RunDirError, TuneforgeError
from tuneforge.rate.ratings import cohen_kappa, import_ratings, read_ratings
from tuneforge.rate.sheet import SCRIPT, make_sheet

QUESTIONS = [f"What is {i} squared?" for i in range(10)]
BASE = [f"I think it is {i * i + 1}." for i in range(10)]
TUNED = [f"{i * i}" for i in range(9)] + ["=HYPERLINK(\"http://x\")"]  # model text that a spreadsheet would run


def fake_run(path: Path, *, judge: list[str] | None = None, status: str = "completed") -> Path:
    """A finished run directory holding what rate reads: eval/baseline.json, eval/tuned.json (+ eval/judge.json)."""
    (path / "eval").mkdir(parents=True)
    (path / "recipe.yaml").write_text("name: fake\n", encoding="utf-8")
    (path / "status.json").write_text(json.dumps({"state": status}), encoding="utf-8")
    for name, answers in (("baseline.json", BASE), ("tuned.json", TUNED)):
        samples = [{"prompt": f"<|user|>{q}", "question": q, "reference": str(i * i), "prediction": a}
                   for i, (q, a) in enumerate(zip(QUESTIONS, answers))]
        (path / "eval" / name).write_text(json.dumps({"metrics": {}, "n": 10, "samples": samples}), encoding="utf-8")
    if judge is not None:
        items = [{"index": i, "winner": w} for i, w in enumerate(judge)]
        (path / "eval" / "judge.json").write_text(json.dumps({"pairwise": {"items": items}}), encoding="utf-8")
    return path


# the people: tuned better on samples 0-5, base on 6-7, a tie on 8, sample 9 left unrated
PEOPLE = {**{i: "tuned" for i in range(6)}, 6: "base", 7: "base", 8: "tie"}
JUDGE = ["tuned", "tuned", "tuned", "base", "tie", "tuned", "base", "tuned", "tie", "tuned"]


def _fill(run: Path, rows: list[list[str]]) -> list[list[str]]:
    """Fill the sheet's rating column as PEOPLE says (A or B from the key, so the choice follows the answers)."""
    key = json.loads((run / "eval" / "rate_key.json").read_text())["items"]
    header = rows[0]
    for row in rows[1:]:
        entry = key[row[0]]
        verdict = PEOPLE.get(entry["index"])
        other = "B" if entry["tuned"] == "A" else "A"
        row[header.index("rating")] = {"tuned": entry["tuned"].lower(), "base": other, "tie": "Tie", None: ""}[verdict]
    return rows


def test_round_trip_sheet_to_ratings_by_hand(tmp_path):
    run = fake_run(tmp_path / "run", judge=JUDGE)
    made = make_sheet(run, seed=3)
    assert made["n"] == 10 and made["html"] == run / "eval" / "rating_sheet.html"
    page = made["html"].read_text(encoding="utf-8")
    key = json.loads((run / "eval" / "rate_key.json").read_text())
    assert key["seed"] == 3 and {v["tuned"] for v in key["items"].values()} == {"A", "B"}  # both sides used
    assert sorted(v["index"] for v in key["items"].values()) == list(range(10))
    assert [v["index"] for v in key["items"].values()] != list(range(10))  # random order
    # blind and self-contained: no key, no model names, nothing loaded from outside, one radio group per item
    assert "tuned" not in page.lower() and "rate_key" not in page and "baseline" not in page.lower()
    assert page.count('type="radio"') == 30 and "<script>" in page and "src=" not in page and "<link" not in page
    assert "&lt;|user|&gt;" not in page and "What is 3 squared?" in page
    sheet_rows = list(csv.reader(io.StringIO((run / "eval" / "rating_sheet.csv").read_text(encoding="utf-8"))))
    assert sheet_rows[0] == ["id", "question", "reference", "answer_a", "answer_b", "rating", "comment"]
    assert len(sheet_rows) == 11 and "'=HYPERLINK(\"http://x\")" in sum(sheet_rows, [])  # kept from running
    # filled in a spreadsheet that saves with semicolons, with a comment over two lines
    rows = _fill(run, sheet_rows)
    rows[1][6] = 'clear; "short"\nsecond line'
    filled = tmp_path / "filled.csv"
    with filled.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter=";").writerows(rows)
    result = import_ratings(run, filled)
    assert json.loads((run / "eval" / "human_ratings.json").read_text()) == json.loads(json.dumps(result))
    assert (result["rated"], result["unrated"], result["items_on_sheet"]) == (9, 1, 10)
    rate = result["win_rate"]
    assert (rate["wins"], rate["losses"], rate["ties"]) == (6, 2, 1) and rate["decided_rate"] == 75.0
    # Wilson 6 of 8 by hand: centre (0.75 + z^2/16) / (1 + z^2/8) = 0.66890, half 0.25963
    assert rate["ci95"] == pytest.approx([40.927, 92.853], abs=0.01)
    assert rate["ties_half_rate"] == pytest.approx(100 * 6.5 / 9) and rate["verdict"] == "no clear difference"
    assert [i["index"] for i in result["items"]] == list(range(9))
    assert {i["index"]: i["winner"] for i in result["items"]} == PEOPLE
    assert 'clear; "short"\nsecond line' in [i["comment"] for i in result["items"]]
    # the judge against the people on samples 0-8: it decided 7 (0,1,2,3,5,6,7), the people agree on 5 (0,1,2,5,6);
    # kappa: observed 6/9, chance (5*6 + 2*2 + 2*1) / 81 = 36/81, (6/9 - 36/81) / (1 - 36/81) = 0.4
    agreement = result["judge_agreement"]
    assert agreement["n"] == 9 and agreement["judge_decided"] == 7
    assert agreement["agreement"] == pytest.approx(5 / 7) and agreement["kappa"] == pytest.approx(0.4)
    assert agreement["confusion"]["tuned"] == {"base": 1, "tuned": 4, "tie": 0}
    assert agreement["confusion"]["tie"] == {"base": 0, "tuned": 1, "tie": 1}


def test_cohen_kappa_by_hand():
    assert cohen_kappa([("a", "a"), ("b", "b")], labels=("a", "b")) == 1.0
    # observed 2/4, chance 0.5*0.5 + 0.5*0.5 = 0.5 -> 0; observed 1/4, chance 0.5*0.75 + 0.5*0.25 = 0.5 -> -0.5
    assert cohen_kappa([("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")], labels=("a", "b")) == pytest.approx(0.0)
    assert cohen_kappa([("a", "a"), ("a", "b"), ("b", "a"), ("b", "a")], labels=("a", "b")) == pytest.approx(-0.5)
    assert cohen_kappa([("a", "a")], labels=("a", "b")) is None and cohen_kappa([]) is None


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_html_sheets_csv_reads_back(tmp_path):
    """The page's own CSV writer (its inline script, run by node) gives what read_ratings reads."""
    rows = [["id", "rating", "comment"], ["item-001", "A", 'said "yes", then\nleft'], ["item-002", "tie", "=1+1"],
            ["item-003", "", ""]]
    program = f"var document = {{addEventListener: function () {{}}}}; var STORE = 'x';{SCRIPT}\n" \
              f"process.stdout.write(toCsv({json.dumps(rows)}));"
    out = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=60, check=True).stdout
    path = tmp_path / "ratings.csv"
    path.write_text(out, encoding="utf-8", newline="")
    read = read_ratings(path, {"item-001", "item-002", "item-003"})
    assert [(r["id"], r["rating"], r["comment"], r["line"]) for r in read] == [
        ("item-001", "A", 'said "yes", then\nleft', 2), ("item-002", "tie", "'=1+1", 4), ("item-003", None, "", 5)]


@pytest.mark.parametrize("text, where, message", [
    ("id,rating\nitem-001,A\nitem-999,B\n", ":3", "unknown item id 'item-999'"),
    ('id,rating,comment\nitem-001,A,"two\nlines"\nitem-002,maybe,\n', ":4", "rating 'maybe' of item-002 is not A, B or tie"),
    ("id,rating\nitem-001,A\nitem-001,B\n", ":3", "rated twice (first at line 2)"),
    ("name,score\nitem-001,A\n", ":1", "no `id` and `rating` columns"),
    ("id,rating\nitem-001,\nitem-002, \n", "", "no ratings: every rating cell is empty"),
    ("", "", "empty"),
])
def test_bad_sheets_are_located(tmp_path, text, where, message):
    run = fake_run(tmp_path / "run")
    make_sheet(run, max_examples=2)
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        import_ratings(run, path)
    assert message in info.value.message and info.value.where == f"{path}{where}" and info.value.fix


def test_a_key_is_never_replaced_by_another_sheets(tmp_path):
    run = fake_run(tmp_path / "run")
    first = make_sheet(run, seed=1, output=tmp_path / "out")
    assert first["html"].parent == tmp_path / "out" and (run / "eval" / "rate_key.json").exists()
    assert make_sheet(run, seed=1, output=tmp_path / "out")["n"] == 10  # the same sheet again is fine
    with pytest.raises(RunDirError, match="another rating sheet") as info:
        make_sheet(run, seed=2)
    assert "--seed 1 --max-examples 10" in info.value.fix


def test_runs_that_cannot_be_rated(tmp_path):
    with pytest.raises(RunDirError, match="did not complete"):
        make_sheet(fake_run(tmp_path / "failed", status="failed"))
    bare = fake_run(tmp_path / "bare")
    (bare / "eval" / "baseline.json").unlink()
    with pytest.raises(RunDirError, match="no base and tuned answers") as info:
        make_sheet(bare)
    assert "eval.baseline: true" in info.value.fix
    with pytest.raises(RunDirError, match="no rating sheet key"):
        import_ratings(fake_run(tmp_path / "unsheeted"), tmp_path / "x.csv")


def test_rate_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from tuneforge.rate.commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps `rate` as a subcommand
    run = fake_run(tmp_path / "run", judge=JUDGE)
    runner = CliRunner()
    made = runner.invoke(app, ["rate", str(run), "--seed", "3", "--max-examples", "10"], env={"COLUMNS": "300"})
    assert made.exit_code == 0 and "rating sheet of 10 items" in made.output and "--import ratings.csv" in made.output
    rows = _fill(run, list(csv.reader(io.StringIO((run / "eval" / "rating_sheet.csv").read_text(encoding="utf-8")))))
    filled = tmp_path / "ratings.csv"
    with filled.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    done = runner.invoke(app, ["rate", str(run), "--import", str(filled)], env={"COLUMNS": "300"})
    assert done.exit_code == 0, done.output
    assert "tuned win rate 75.0% of decided items, 95% CI [40.9, 92.9]" in done.output
    assert "the judge agrees with the people on 71% of its 7 decided items, Cohen's kappa 0.40" in done.output
    clash = runner.invoke(app, ["rate", str(run), "--import", str(filled), "--seed", "4"])
    assert isinstance(clash.exception, TuneforgeError) and "--seed" in str(clash.exception)
