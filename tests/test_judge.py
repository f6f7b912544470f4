"""eval.judge: the section's checks, judge_run against a stub OpenAI-compatible endpoint on 127.0.0.1 (request shape,
both orders, position and length bias, the tuned win rate with its interval), and a local judge on the tiny model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from pydantic import ValidationError

from tuneforge.errors import ModelError, RecipeError
from tuneforge.evaluate.judge import judge_inputs, judge_run, make_judge, win_rate
from tuneforge.evaluate.judge_section import JudgeSection, describe_judge_run

PROMPTS = [f"Question {i}?" for i in range(5)]
BASE = ["short", "tiny", "a fairly long base answer here", "b", "no"]
TUNED = ["a longer tuned answer", "a longer tuned answer too", "brief", "a much longer tuned answer", "a tuned answer"]
REFS = ["r0", "r1", "r2", "r3", "r4"]


def _answers_in(content: str) -> tuple[str, str]:
    first = content.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
    second = content.split("[Answer B]\n", 1)[1].split("\n\nThe order", 1)[0]
    return first, second


@pytest.fixture()
def endpoint():
    """A stub chat-completions server. The model name picks its behaviour: `longer` prefers the longer answer,
    `always-a` always says [[A]], `grader` gives each answer a score of its length in words (at most 10),
    `broken` answers HTTP 500."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            content = body["messages"][-1]["content"]
            if body["model"] == "broken":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"model not found")
                return
            if body["model"] == "grader":
                answer = content.split("[Answer to grade]\n", 1)[1].split("\n\nGive a short", 1)[0]
                reply = f"Fine. Score: {min(10, len(answer.split()))}"
            elif body["model"] == "always-a":
                reply = "The first one reads better. [[A]]"
            else:
                first, second = _answers_in(content)
                reply = "Longer is better. " + ("[[A]]" if len(first) > len(second) else "[[B]]")
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen
    server.shutdown()
    server.server_close()


def test_endpoint_judge_asks_both_orders_and_measures_length_bias(endpoint, monkeypatch):
    url, seen = endpoint
    monkeypatch.setenv("TF_TEST_JUDGE_KEY", "sekret")
    settings = JudgeSection(url=url, model_name="longer", api_key_env="TF_TEST_JUDGE_KEY", max_new_tokens=64)
    result = judge_run(settings, PROMPTS, BASE, TUNED, REFS)
    assert len(seen) == 10  # 5 pairs x 2 orders
    for request in seen:
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sekret"
        body = request["body"]
        assert body["model"] == "longer" and body["temperature"] == 0.0 and body["max_tokens"] == 64
        assert [m["role"] for m in body["messages"]] == ["user"]
    for i in range(5):  # pair i is asked twice: base shown first, then tuned shown first; the reference both times
        one, two = (seen[2 * i]["body"]["messages"][0]["content"], seen[2 * i + 1]["body"]["messages"][0]["content"])
        assert _answers_in(one) == (BASE[i], TUNED[i]) and _answers_in(two) == (TUNED[i], BASE[i])
        assert f"[User request]\n{PROMPTS[i]}" in one and f"[Reference answer]\n{REFS[i]}" in two
    pair = result["pairwise"]
    assert pair["wins"] == {"base": 1, "tuned": 4, "tie": 0}  # the tuned answer is longer in 4 of 5 pairs
    assert pair["position_consistency"] == 1.0 and pair["position_bias"] is False
    assert pair["first_position_rate"] == 0.5 and pair["decisive_verdicts"] == 10
    assert pair["longer_preferred_rate"] == 1.0 and pair["length_decided_pairs"] == 5
    assert [item["index"] for item in pair["items"]] == [0, 1, 2, 3, 4]
    assert [item["winner"] for item in pair["items"]] == ["tuned", "tuned", "base", "tuned", "tuned"]
    # Wilson by hand, 4 of 5 (z = 1.96): centre (0.8 + z^2/10) / (1 + z^2/5) = 0.66965,
    # half width z * sqrt(0.8 * 0.2 / 5 + z^2 / 100) / (1 + z^2/5) = 0.29412
    rate = pair["tuned_win_rate"]
    assert rate["decided_rate"] == 80.0 and rate["ci95"] == pytest.approx([37.553, 96.377], abs=0.01)
    assert rate["verdict"] == "no clear difference" and rate["ties_half_rate"] == 80.0
    assert result["judge"] == f"{url} (longer)" and result["n"] == 5 and result["grades"] == {}
    assert "sekret" not in json.dumps(result)  # the key never reaches eval/judge.json
    assert "tuned wins 80% of decided pairs [38, 96] (4 won, 0 tied, 1 lost)" in describe_judge_run(result)


def test_a_judge_that_always_says_a_shows_position_bias(endpoint):
    url, seen = endpoint
    result = judge_run(JudgeSection(url=url, model_name="always-a", max_examples=5), PROMPTS, BASE, TUNED, REFS)
    pair = result["pairwise"]
    assert pair["position_consistency"] == 0.0 and pair["position_bias"] is True
    assert pair["first_position_rate"] == 1.0
    # Wilson, 10 of 10: centre (1 + z^2/20) / (1 + z^2/10) = 0.86124, half z * sqrt(z^2/400) / (1 + z^2/10) = 0.13877
    assert pair["first_position_ci95"] == pytest.approx([0.72247, 1.0], abs=1e-4)
    assert pair["wins"] == {"base": 0, "tuned": 0, "tie": 5}
    rate = pair["tuned_win_rate"]
    assert rate["decided_rate"] is None and rate["ci95"] is None and rate["ties_half_rate"] == 50.0
    assert rate["verdict"] == "no clear difference" and seen[0]["auth"] is None  # no key in the environment


def test_max_examples_and_grades(endpoint):
    url, seen = endpoint
    settings = JudgeSection(url=url, model_name="grader", max_examples=3, pairwise=False, grade=True)
    result = judge_run(settings, PROMPTS, BASE, TUNED, REFS)
    assert len(seen) == 6 and "pairwise" not in result  # 3 base + 3 tuned answers, one request each
    assert [g["score"] for g in result["grades"]["base"]["items"]] == [1, 1, 6]
    assert result["grades"]["tuned"]["mean_score"] == pytest.approx((4 + 5 + 1) / 3)
    assert "tuned graded 3.3/10" in describe_judge_run(result)


def test_endpoint_errors_name_the_keys(endpoint):
    url, _ = endpoint
    with pytest.raises(ModelError, match=r"(?s)HTTP 500.*eval\.judge\.model_name") as info:
        judge_run(JudgeSection(url=url, model_name="broken"), PROMPTS[:1], BASE[:1], TUNED[:1])
    assert info.value.where == "eval.judge.url"


def test_win_rate_by_hand():
    rate = win_rate(wins=3, ties=2, losses=1)
    assert rate["n"] == 6 and rate["decided_rate"] == 75.0 and rate["ties_half_rate"] == pytest.approx(100 * 4 / 6)
    assert rate["ci95"] == pytest.approx([30.064, 95.438], abs=0.01)  # Wilson 3 of 4
    assert win_rate(40, 0, 10)["verdict"] == "tuned better" and win_rate(10, 5, 40)["verdict"] == "base better"


def test_judge_inputs_from_saved_evaluations():
    def result(predictions):
        return {"samples": [{"prompt": f"<t>q{i}</t>", "question": f"q{i}", "reference": f"r{i}", "prediction": p}
                            for i, p in enumerate(predictions)]}

    prompts, base, tuned, refs = judge_inputs(result(["a", "b", "c"]), result(["x", "y"]))
    assert prompts == ["q0", "q1"] and base == ["a", "b"] and tuned == ["x", "y"] and refs == ["r0", "r1"]


def _keyed(**settings) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        JudgeSection(**settings)
    error = info.value.errors()[0]
    cause = (error.get("ctx") or {}).get("error")
    return getattr(cause, "key", ".".join(map(str, error["loc"]))), str(cause or error["msg"])


@pytest.mark.parametrize("settings, key, text", [
    ({"model": "m", "url": "http://h/v1", "model_name": "x"}, "eval.judge.url", "not both"),
    ({}, "eval.judge.model", "needs model"),
    ({"url": "http://h/v1"}, "eval.judge.model_name", "model_name: gpt-4o-mini"),
    ({"model": "m", "model_name": "x"}, "eval.judge.model_name", "use model: instead"),
    ({"model": "m", "api_key": "sk-123"}, "eval.judge.api_key", "api_key_env"),
    ({"model": "m", "api_key_env": "sk-proj-abcdef"}, "api_key_env", "looks like an API key"),
    ({"model": "m", "api_key_env": "MY KEY"}, "api_key_env", "not an environment variable name"),
    ({"url": "localhost:8000/v1", "model_name": "x"}, "url", "http://localhost:8000/v1"),
    ({"url": "https://me:pw@host/v1", "model_name": "x"}, "url", "without user:password@"),
    ({"model": "m", "pairwise": False}, "eval.judge.pairwise", "grade: true"),
    ({"model": "m", "max_examples": 0}, "max_examples", "greater than 0"),
])
def test_section_errors_name_the_key_and_the_fix(settings, key, text):
    found_key, message = _keyed(**settings)
    assert found_key == key and text in message


def test_make_judge_messages_name_the_real_keys():
    with pytest.raises(RecipeError, match=r"eval\.judge\.model_name"):
        make_judge(url="http://h/v1")
    with pytest.raises(RecipeError, match="not both"):
        make_judge(url="http://h/v1", model="m", model_name="x")
    with pytest.raises(RecipeError, match=r"`url` \+ `model_name`"):
        make_judge()


def test_local_judge_on_the_tiny_model(tiny_model_dir):
    """A model tuneforge loads as the judge (a random one: no verdicts, so every pair is a tie, and no bias is
    claimed from replies that have none)."""
    settings = JudgeSection(model=str(tiny_model_dir), max_examples=2, max_new_tokens=4, grade=True)
    result = judge_run(settings, PROMPTS, BASE, TUNED, REFS)
    pair = result["pairwise"]
    assert result["judge"] == str(tiny_model_dir) and result["n"] == 2 and pair["n"] == 2
    assert sum(pair["wins"].values()) == 2 and pair["position_bias"] is False
    assert len(result["grades"]["tuned"]["items"]) == 2
    json.dumps(result)


def test_eval_judge_in_a_recipe_judges_every_run(endpoint, tmp_path, tiny_model_dir, small_sft_file):
    """eval.judge wired into a run: base vs tuned answers of the held-out set go to the judge in both orders, and
    eval/judge.json + summary.json carry the tuned win rate with its interval."""
    from rich.console import Console

    from conftest import tiny_recipe
    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    url, seen = endpoint
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 1},
                                      eval={"max_examples": 3, "max_new_tokens": 4, "few_shot": 0, "forgetting": False,
                                            "judge": {"url": url, "model_name": "longer"}}))
    run = train(recipe, output=str(tmp_path / "run"), console=Console(record=True, width=200), doctor=False)
    assert len(seen) == 6  # 3 held-out prompts x 2 orders
    judged = run.read_json("eval/judge.json")
    assert judged["n"] == 3 and judged["pairwise"]["decisive_verdicts"] == 6
    rate = run.read_json("summary.json")["judge"]
    assert rate == judged["pairwise"]["tuned_win_rate"] and "ci95" in rate  # None when no pair was decided
    assert sum(judged["pairwise"]["wins"].values()) == 3


def test_eval_judge_is_refused_where_nothing_is_judged(tiny_model_dir, small_sft_file):
    from conftest import tiny_recipe
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import parse_recipe

    with pytest.raises(RecipeError, match="eval.judge"):
        parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, method="cpt",
                                 eval={"judge": {"url": "http://127.0.0.1:9/v1", "model_name": "m"}}))
