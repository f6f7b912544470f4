"""Every metric on hand-made cases with known answers (a passing and a failing case each), the metric specs the
recipe uses, custom metrics, the code sandbox, and the judge's order-swap bias check."""

from __future__ import annotations

import json
import time

import pytest

from tuneforge.errors import RecipeError
from tuneforge.evaluate import metrics as m
from tuneforge.evaluate.judge import compare_answers, grade_answers, parse_score, parse_verdict
from tuneforge.evaluate.sandbox import run_python

# -- exact match, contains, regex -------------------------------------------------------------------------------


def test_exact_match_and_normalisation_options():
    assert m.exact_match("  Paris\n", "Paris") == 1.0
    assert m.exact_match("paris", "Paris") == 0.0
    assert m.exact_match("paris", "Paris", ignore_case=True) == 1.0
    assert m.exact_match("Paris.", "Paris", ignore_punctuation=True) == 1.0
    assert m.exact_match("New   York", "New York") == 0.0
    assert m.exact_match("New   York", "New York", ignore_whitespace=True) == 1.0
    assert m.exact_match("The Eiffel tower", "eiffel tower", ignore_case=True, ignore_articles=True) == 1.0
    assert m.exact_match("London", "Paris", ignore_case=True, ignore_punctuation=True) == 0.0


def test_contains():
    assert m.contains("The answer is 42.", "42") == 1.0
    assert m.contains("The answer is 41.", "42") == 0.0
    assert m.contains("it is PARIS", "paris") == 0.0
    assert m.contains("it is PARIS", "paris", ignore_case=True) == 1.0


def test_regex_with_pattern_option_and_reference_as_pattern():
    assert m.regex_match("Order #123 shipped", "", pattern=r"#\d+") == 1.0
    assert m.regex_match("Order shipped", "", pattern=r"#\d+") == 0.0
    assert m.regex_match("abc123", "", pattern=r"[a-z]+", fullmatch=True) == 0.0
    assert m.regex_match("YES", "", pattern="yes", ignore_case=True) == 1.0
    # no pattern: the reference is the pattern
    assert m.regex_match("2024-05-01", r"\d{4}-\d{2}-\d{2}") == 1.0
    assert m.regex_match("May 1st", r"\d{4}-\d{2}-\d{2}") == 0.0


# -- JSON --------------------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["name", "quantity"],
          "properties": {"name": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}}}


def test_json_valid():
    assert m.json_valid('{"a": 1}', "") == 1.0
    assert m.json_valid("{'a': 1}", "") == 0.0
    assert m.json_valid('```json\n{"a": 1}\n```', "") == 0.0
    assert m.json_valid('```json\n{"a": 1}\n```', "", allow_fence=True) == 1.0


def test_json_schema_inline_and_from_file(tmp_path):
    good, bad_type, not_json = '{"name": "Ana", "quantity": 3}', '{"name": "Ana", "quantity": "3"}', "name: Ana"
    assert m.json_schema(good, "", schema=SCHEMA) == 1.0
    assert m.json_schema(bad_type, "", schema=SCHEMA) == 0.0
    assert m.json_schema(not_json, "", schema=SCHEMA) == 0.0
    assert m.json_schema('{"name": "Ana"}', "", schema=json.dumps(SCHEMA)) == 0.0  # inline JSON text; missing key
    path = tmp_path / "order.json"
    path.write_text(json.dumps(SCHEMA))
    assert m.score([good, bad_type], ["", ""], [{"name": "json_schema", "schema": str(path)}]) == {"json_schema": 50.0}
    yaml_path = tmp_path / "order.yaml"
    yaml_path.write_text("type: object\nrequired: [name]\n")
    assert m.json_schema('{"name": 1}', "", schema=str(yaml_path)) == 1.0


def test_json_schema_errors_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        m.resolve_metrics([{"name": "json_schema", "schema": str(tmp_path / "missing.json")}])
    with pytest.raises(RecipeError, match="schema itself is invalid"):
        m.resolve_metrics([{"name": "json_schema", "schema": {"type": "no-such-type"}}])
    with pytest.raises(RecipeError, match="needs a `schema`"):
        m.resolve_metrics(["json_schema"])


# -- ROUGE-L, labels ------------------------------------------------------------------------------------------------


def test_lcs_and_rouge_l_known_values():
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert m.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert m.rouge_l("dogs bark loudly", "the cat sat") == 0.0
    # reference "the cat sat on the mat" (6), prediction "the cat on mat" (4): LCS 4 -> P=1, R=4/6, F=0.8
    assert m.rouge_l("The cat, on mat!", "the cat sat on the mat") == pytest.approx(0.8)
    assert m.rouge_l("", "") == 1.0 and m.rouge_l("", "x") == 0.0


def test_accuracy_and_macro_f1():
    assert m.accuracy(" Positive.", "positive") == 1.0
    assert m.accuracy("negative", "positive") == 0.0
    refs = ["a", "a", "b", "b"]
    assert m.macro_f1(["a", "a", "b", "b"], refs) == 1.0
    # class a: tp=2 fp=1 fn=0 -> F1 0.8; class b: tp=1 fp=0 fn=1 -> F1 2/3; macro = 0.7333
    assert m.macro_f1(["a", "a", "a", "b"], refs) == pytest.approx((0.8 + 2 / 3) / 2)
    # a prediction outside the label set costs its true class's recall only
    assert m.macro_f1(["a", "a", "rambling", "b"], refs) == pytest.approx((1.0 + 2 / 3) / 2)
    assert m.macro_f1(["b", "b", "a", "a"], refs) == 0.0
    scores = m.score(["a", "a", "a", "b"], refs, ["accuracy", "macro_f1"])
    assert scores["accuracy"] == 75.0 and scores["macro_f1"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)


# -- pass@k and the sandbox -------------------------------------------------------------------------------------------

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_pass_at_k_estimator():
    assert m.pass_at_k_estimate(10, 0, 1) == 0.0
    assert m.pass_at_k_estimate(10, 10, 5) == 1.0
    assert m.pass_at_k_estimate(5, 1, 1) == pytest.approx(0.2)
    assert m.pass_at_k_estimate(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError):
        m.pass_at_k_estimate(1, 1, 2)


def test_pass_at_k_runs_candidates_against_tests():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a - b\n"
    syntax = "def add(a, b) return a + b"
    details = []
    value = m.pass_at_k([good, wrong, syntax], [ADD_TESTS] * 3, k=1, timeout=20, details=details)
    assert value == pytest.approx(1 / 3)
    assert [d["passed"] for d in details] == [[True], [False], [False]]
    assert "AssertionError" in details[1]["errors"][0] and "SyntaxError" in details[2]["errors"][0]
    # several candidates per problem: 1 of 2 passes -> pass@1 = 0.5, pass@2 = 1
    assert m.pass_at_k([[good, wrong]], [ADD_TESTS], k=1, timeout=20) == pytest.approx(0.5)
    assert m.score([[good, wrong]], [ADD_TESTS], [{"name": "pass_at_k", "k": 2, "timeout": 20}]) == {"pass@2": 100.0}


def test_sandbox_timeout_kills_the_program():
    started = time.time()
    result = run_python("while True:\n    pass\n", timeout=1.0)
    assert result.timed_out and not result.passed and result.returncode is None
    assert time.time() - started < 15  # margin for a loaded machine: the namespace setup starts a few processes


def test_sandbox_blocks_network():
    code = ("import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "s.settimeout(3)\n"
            "s.connect(('1.1.1.1', 80))\n"
            "print('connected')\n")
    result = run_python(code, timeout=20)
    assert not result.passed and "connected" not in result.stdout
    assert "PermissionError" in result.stderr or "unreachable" in result.stderr.lower()
    # without the network namespace the audit hook alone still refuses, also for the raw _socket module
    raw = run_python("import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 80))\n", timeout=20,
                     isolate_network=False)
    assert raw.isolation == "audit-hook" and not raw.passed and "network access is blocked" in raw.stderr
    # ...and a shell-out to get around it
    shell = run_python("import os\nos.system('true')\n", timeout=20, isolate_network=False)
    assert not shell.passed and "blocked" in shell.stderr


def test_sandbox_runs_ordinary_code_and_reports_failures():
    ok = run_python("print(sum(range(10)))", timeout=20)
    assert ok.passed and ok.stdout.strip() == "45"
    failed = run_python("raise SystemExit(3)", timeout=20)
    assert failed.returncode == 3 and not failed.passed
    hog = run_python("x = bytearray(2 * 1024**3)\n", timeout=20, memory_mb=256)
    assert not hog.passed and "MemoryError" in hog.stderr
    escape = run_python("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", timeout=20, memory_mb=256)
    assert not escape.passed  # the hard limit is set too, so the candidate cannot lift it


# -- specs, custom metrics, score() --------------------------------------------------------------------------------


def test_metric_specs_names_options_and_errors():
    specs = m.resolve_metrics(["exact_match", {"name": "exact_match", "ignore_case": True, "label": "em_loose"},
                               {"regex": {"pattern": "^yes$"}}, {"name": "pass_at_k", "k": 5}])
    assert [s.key for s in specs] == ["exact_match", "em_loose", "regex", "pass@5"]
    with pytest.raises(RecipeError, match="did you mean `exact_match`"):
        m.resolve_metrics(["exact_mach"])
    with pytest.raises(RecipeError, match="unknown option `pattren`"):
        m.resolve_metrics([{"name": "regex", "pattern": "x", "pattren": "y"}])
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        m.resolve_metrics([{"name": "regex", "pattern": "(unclosed"}])
    with pytest.raises(RecipeError, match="give one a `label:`"):
        m.resolve_metrics(["contains", {"name": "contains", "ignore_case": True}])


def test_score_keeps_the_original_interface():
    assert m.score(["a", "b"], ["a", "c"], ["exact_match", "contains"]) == {"exact_match": 50.0, "contains": 50.0}
    assert set(m.METRICS) >= {"exact_match", "contains", "json_valid", "json_schema", "regex", "rouge_l",
                              "accuracy", "macro_f1", "pass_at_k"}


def test_custom_metric_from_file(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(
        "def starts_same(prediction, reference):\n    return prediction[:1] == reference[:1]\n\n"
        "def share_long(predictions, references):\n    return sum(len(p) > 3 for p in predictions) / len(predictions)\n"
        "share_long.corpus = True\n\n"
        "def out_of_range(prediction, reference):\n    return 7\n\n"
        "def one_arg(prediction):\n    return 1.0\n"
    )
    fn = m.load_custom_metric(path, "starts_same")
    assert fn("apple", "avocado") is True
    spec = {"name": "custom", "path": str(path), "function": "starts_same"}
    assert m.score(["apple", "pear"], ["avocado", "apple"], [spec]) == {"starts_same": 50.0}
    corpus = {"name": "custom", "path": str(path), "function": "share_long"}
    assert m.score(["long one", "no"], ["", ""], [corpus]) == {"share_long": 50.0}
    with pytest.raises(RecipeError, match="number in \\[0, 1\\]"):
        m.score(["a"], ["b"], [{"name": "custom", "path": str(path), "function": "out_of_range"}])
    with pytest.raises(RecipeError, match="defines no `missing`; functions in it: starts_same"):
        m.load_custom_metric(path, "missing")
    with pytest.raises(RecipeError, match="must take two arguments"):
        m.load_custom_metric(path, "one_arg")
    with pytest.raises(RecipeError, match="file not found"):
        m.load_custom_metric(tmp_path / "nope.py", "f")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(RecipeError, match="importing the file failed: ModuleNotFoundError"):
        m.load_custom_metric(broken, "f")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "s.json").write_text(json.dumps(SCHEMA))
    spec = m.parse_metric_spec({"name": "json_schema", "schema": "schemas/s.json"}, base_dir=tmp_path)
    assert spec.options["schema"] == str(tmp_path / "schemas" / "s.json")


# -- judge -----------------------------------------------------------------------------------------------------------


def test_parse_score_and_verdict():
    assert parse_score("Reasoning...\nScore: 7") == 7
    assert parse_score("score = 10/10") == 10
    assert parse_score("no number here") is None
    assert parse_verdict("A is clearer. [[A]]") == "A"
    assert parse_verdict("tie [[C]]") == "C"
    assert parse_verdict("I cannot decide") is None


def _answers():
    prompts = [f"question {i}" for i in range(6)]
    base = [f"short {i}" for i in range(6)]
    tuned = [f"a much longer and better answer {i}" for i in range(6)]
    return prompts, base, tuned


def test_judge_that_always_prefers_position_a_is_caught():
    prompts, base, tuned = _answers()
    calls = []

    def always_a(prompt: str) -> str:
        calls.append(prompt)
        return "Both are fine but the first reads better. [[A]]"

    result = compare_answers(always_a, prompts, base, tuned, names=("base", "tuned"))
    assert len(calls) == 12  # each pair judged in both orders
    assert result["position_consistency"] == 0.0
    assert result["first_position_rate"] == 1.0
    assert result["position_bias"] is True
    assert result["wins"] == {"base": 0, "tuned": 0, "tie": 6}  # no verdict survives the swap


def test_consistent_judge_and_length_bias():
    prompts, base, tuned = _answers()

    def prefers_longer(prompt: str) -> str:
        first = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        second = prompt.split("[Answer B]\n")[1].split("\n\nThe order")[0]
        return "[[A]]" if len(first) > len(second) else "[[B]]"

    result = compare_answers(prefers_longer, prompts, base, tuned, names=("base", "tuned"))
    assert result["position_consistency"] == 1.0 and result["position_bias"] is False
    assert result["wins"]["tuned"] == 6 and result["win_rate"]["tuned"] == 100.0
    assert result["first_position_rate"] == 0.5
    assert result["longer_preferred_rate"] == 1.0 and result["length_bias"] is True


def test_grade_answers_parses_scores():
    replies = iter(["fine. Score: 8", "bad. Score: 2", "no score given"])
    result = grade_answers(lambda prompt: next(replies), ["q1", "q2", "q3"], ["long answer here", "x", "y"])
    assert result["mean_score"] == 5.0 and result["unparsed"] == 1
    assert result["score_pct"] == pytest.approx(100 * 4 / 9)


def test_openai_compatible_judge_over_http(monkeypatch):
    """A fake OpenAI-compatible server on localhost: the request shape, the key from the environment, the reply."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from tuneforge.errors import ModelError
    from tuneforge.evaluate.judge import openai_judge

    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.update(path=self.path, auth=self.headers.get("Authorization"), body=body)
            if body["model"] == "broken":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"boom")
                return
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine. [[B]]"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sekret")
        url = f"http://127.0.0.1:{server.server_port}/v1"
        ask = openai_judge(url, "judge-model", api_key_env="JUDGE_KEY")
        assert ask("Which is better?") == "fine. [[B]]"
        assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer sekret"
        assert seen["body"]["model"] == "judge-model" and seen["body"]["temperature"] == 0.0
        assert seen["body"]["messages"] == [{"role": "user", "content": "Which is better?"}]
        with pytest.raises(ModelError, match="HTTP 500"):
            openai_judge(url, "broken")("x")
    finally:
        server.shutdown()
    with pytest.raises(ModelError, match="cannot reach"):
        openai_judge(f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=2)("x")


def test_judge_results_reads_saved_evaluations():
    from tuneforge.evaluate.judge import judge_results

    def sample(i, prediction):
        return {"prompt": f"<t>q{i}</t>", "question": f"q{i}", "reference": f"r{i}", "prediction": prediction}

    results = {"base": {"samples": [sample(i, "x") for i in range(3)]},
               "tuned": {"samples": [sample(i, "a longer answer") for i in range(3)]}}
    asked = []

    def ask(prompt):
        asked.append(prompt)
        return "Score: 6 [[A]]"

    out = judge_results(ask, results, description="fake")
    assert out["judge"] == "fake" and set(out["grades"]) == {"base", "tuned"}
    assert out["grades"]["tuned"]["mean_score"] == 6.0
    assert out["pairwise"]["position_bias"] is True and out["pairwise"]["n"] == 3
    assert all("[User request]\nq" in prompt for prompt in asked)  # the question, not the templated prompt
    json.dumps(out)


def test_a_judge_that_never_answers_is_not_called_biased():
    prompts, base, tuned = _answers()
    result = compare_answers(lambda prompt: "I am not sure.", prompts, base, tuned)
    assert result["unparsed"] == 12 and result["usable_pairs"] == 0
    assert result["position_consistency"] is None and result["position_bias"] is False
    assert result["wins"]["tie"] == 6
