"""LLM-as-judge with a rubric, and the checks for its known biases.

A judge is any callable `ask(prompt: str) -> str`: a model tuneforge can load (`local_judge`), or an
OpenAI-compatible chat endpoint (`openai_judge`, plain urllib, no SDK). Two ways to judge:

- `grade_answers`: each answer alone gets a 1-10 score against the rubric (and the reference, when there is one);
  the report gives the mean and the correlation of score with answer length (length bias).
- `compare_answers`: two systems' answers to the same prompt (e.g. base vs tuned) are shown side by side, and
  every pair is judged twice, once in each order. A judge without position bias names the same answer both
  times; `position_consistency` is the share of pairs where it did, `first_position_rate` the share of
  verdicts that went to whichever answer was shown first (0.5 is unbiased). Only pairs judged the same way in
  both orders count as wins; the rest are ties. `longer_preferred_rate` is the share of decided pairs won by
  the longer answer (length bias: judges tend to prefer longer answers whatever their quality).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable

Ask = Callable[[str], str]

DEFAULT_RUBRIC = (
    "Judge how well the answer does what the user asked: correctness first, then completeness, then following "
    "the requested format exactly. Do not reward length: a short correct answer beats a long one with errors "
    "or padding."
)

GRADE_TEMPLATE = """You are a strict, fair grader.

Rubric:
{rubric}

[User request]
{prompt}
{reference_block}
[Answer to grade]
{answer}

Give a short justification, then on the last line write the score from 1 (worst) to 10 (best) as: Score: N"""

COMPARE_TEMPLATE = """You are a strict, fair judge comparing two assistants' answers to the same request.

Rubric:
{rubric}

[User request]
{prompt}
{reference_block}
[Answer A]
{first}

[Answer B]
{second}

The order of the answers is random and says nothing about quality; ignore length except as the rubric asks.
Give a short justification, then on the last line write exactly one verdict: [[A]] if A is better, [[B]] if B is
better, [[C]] for a tie."""

# Thresholds for flagging a bias in the report.
POSITION_CONSISTENCY_MIN = 0.8  # below this, the judge's verdicts flip too often with answer order
LENGTH_PREFERENCE_MAX = 0.8  # above this, the longer answer wins suspiciously often


def _reference_block(reference: str | None) -> str:
    return f"\n[Reference answer]\n{reference}\n" if reference else ""


_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(10|[1-9])(?:\s*/\s*10)?\b", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_score(text: str) -> int | None:
    """The last "Score: N" (1-10) in the judge's reply, or None if it gave none."""
    matches = _SCORE.findall(text)
    return int(matches[-1]) if matches else None


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "C" (tie) from the judge's last [[X]], or None if it gave none."""
    matches = _VERDICT.findall(text)
    return matches[-1] if matches else None


# ---------------------------------------------------------------------------------------------------------------
# Judges


def openai_judge(url: str, model: str, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 512, timeout: float = 120.0,
                 system: str | None = None) -> Ask:
    """A judge served by an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, TGI, ...).

    url: the API base (".../v1") or the full ".../chat/completions" address. The key is read from the
    environment variable `api_key_env` unless given, so it never has to be written in a recipe.
    """
    import os
    import urllib.error
    import urllib.request

    from tuneforge.errors import ModelError

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    key = api_key or os.environ.get(api_key_env)

    def ask(prompt: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise ModelError(f"judge endpoint {endpoint} answered HTTP {exc.code}: {detail}", where="eval.judge.url",
                             fix="check the URL, the model name and the API key variable") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ModelError(f"cannot reach the judge endpoint {endpoint}: {exc}", where="eval.judge.url",
                             fix="check the URL and that the server is running") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"judge endpoint {endpoint} returned no choices[0].message.content: {str(reply)[:300]}",
                             where="eval.judge.url") from None

    return ask


def local_judge(model, tokenizer, *, max_new_tokens: int = 256, batch_size: int = 8) -> Ask:
    """A judge that is a model tuneforge loaded (greedy, through its chat template). `ask.batch(prompts)` answers
    several prompts in one generation batch; the judging functions use it when present."""
    from tuneforge.data.template import render_chat
    from tuneforge.evaluate.generation import generate_answers

    def template(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return render_chat(tokenizer, messages, add_generation_prompt=True) if tokenizer.chat_template else prompt

    def batch(prompts: list[str]) -> list[str]:
        return generate_answers(model, tokenizer, [template(p) for p in prompts], max_new_tokens=max_new_tokens,
                                batch_size=batch_size)

    def ask(prompt: str) -> str:
        return batch([prompt])[0]

    ask.batch = batch  # type: ignore[attr-defined]
    return ask


def _ask_all(ask: Ask, prompts: list[str]) -> list[str]:
    batch = getattr(ask, "batch", None)
    return batch(prompts) if batch is not None else [ask(p) for p in prompts]


# ---------------------------------------------------------------------------------------------------------------
# Single-answer grading


def grade_answers(ask: Ask, prompts: list[str], answers: list[str], references: list[str] | None = None, *,
                  rubric: str = DEFAULT_RUBRIC) -> dict:
    """Score each answer 1-10 against the rubric.

    -> {"mean_score": 1-10 mean over parsed scores, "score_pct": the same on 0-100, "n", "unparsed",
        "length_correlation": Pearson r of score vs answer length in characters (None if undefined),
        "items": [{"score", "reply"}]}
    """
    references = references or [None] * len(prompts)
    queries = [GRADE_TEMPLATE.format(rubric=rubric, prompt=p, answer=a, reference_block=_reference_block(r))
               for p, a, r in zip(prompts, answers, references)]
    replies = _ask_all(ask, queries)
    scores = [parse_score(reply) for reply in replies]
    parsed = [(s, len(a)) for s, a in zip(scores, answers) if s is not None]
    mean = sum(s for s, _ in parsed) / len(parsed) if parsed else None
    return {
        "mean_score": mean,
        "score_pct": None if mean is None else 100.0 * (mean - 1) / 9,
        "n": len(prompts),
        "unparsed": len(prompts) - len(parsed),
        "length_correlation": _pearson([float(n) for _, n in parsed], [float(s) for s, _ in parsed]),
        "items": [{"score": s, "reply": r} for s, r in zip(scores, replies)],
    }


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


# ---------------------------------------------------------------------------------------------------------------
# Pairwise comparison with order swapping


@dataclass
class PairVerdict:
    first_order: str | None  # verdict with system X shown as A: "A" (X better), "B" (Y better), "C" tie, None
    swapped_order: str | None  # verdict with system Y shown as A
    winner: str  # "x", "y" or "tie" (a tie unless both orders agree)
    consistent: bool  # both orders named the same system (or both said tie)


def _system_from(verdict: str | None, shown_first: str, shown_second: str) -> str | None:
    return {"A": shown_first, "B": shown_second, "C": "tie"}.get(verdict or "")


def compare_answers(ask: Ask, prompts: list[str], answers_x: list[str], answers_y: list[str],
                    references: list[str] | None = None, *, rubric: str = DEFAULT_RUBRIC,
                    names: tuple[str, str] = ("base", "tuned")) -> dict:
    """Judge system X against system Y on each prompt, in both orders.

    -> {"names": [x, y], "n", "wins": {x: .., y: .., "tie": ..}, "win_rate": {x: %, y: %} (ties count half),
        "position_consistency": share of pairs judged the same in both orders (of those with a verdict in both;
        None if none had), "usable_pairs": how many pairs that is,
        "first_position_rate": share of decisive verdicts that went to the answer shown first (0.5 unbiased),
        "longer_preferred_rate": share of consistently decided pairs (answers of different length) won by the
        longer answer, or None, "position_bias": bool, "length_bias": bool, "unparsed": verdicts with no [[X]],
        "items": [{"first_order", "swapped_order", "winner", "consistent"}]}
    """
    x_name, y_name = names
    references = references or [None] * len(prompts)
    queries = []
    for p, a, b, r in zip(prompts, answers_x, answers_y, references):
        block = _reference_block(r)
        queries.append(COMPARE_TEMPLATE.format(rubric=rubric, prompt=p, reference_block=block, first=a, second=b))
        queries.append(COMPARE_TEMPLATE.format(rubric=rubric, prompt=p, reference_block=block, first=b, second=a))
    replies = _ask_all(ask, queries)
    verdicts = [parse_verdict(reply) for reply in replies]

    items, wins = [], {x_name: 0, y_name: 0, "tie": 0}
    first_wins = decisive = 0
    longer_wins = length_decided = 0
    for i, (a, b) in enumerate(zip(answers_x, answers_y)):
        v1, v2 = verdicts[2 * i], verdicts[2 * i + 1]
        s1 = _system_from(v1, x_name, y_name)
        s2 = _system_from(v2, y_name, x_name)
        for v in (v1, v2):
            if v in ("A", "B"):
                decisive += 1
                first_wins += v == "A"
        consistent = s1 is not None and s1 == s2
        winner = s1 if consistent else "tie"
        wins[winner] += 1
        if consistent and winner != "tie" and len(a) != len(b):
            length_decided += 1
            longer = x_name if len(a) > len(b) else y_name
            longer_wins += winner == longer
        items.append(PairVerdict(v1, v2, winner, consistent).__dict__)

    n = len(items)
    # Consistency is measured on pairs with a verdict in both orders: a reply without one says nothing about order.
    usable = [item for item in items if item["first_order"] is not None and item["swapped_order"] is not None]
    consistency = sum(item["consistent"] for item in usable) / len(usable) if usable else None
    first_rate = first_wins / decisive if decisive else None
    longer_rate = longer_wins / length_decided if length_decided else None
    return {
        "names": [x_name, y_name],
        "n": n,
        "wins": wins,
        "win_rate": {name: (100.0 * (wins[name] + 0.5 * wins["tie"]) / n if n else None) for name in (x_name, y_name)},
        "position_consistency": consistency,
        "first_position_rate": first_rate,
        "longer_preferred_rate": longer_rate,
        "position_bias": consistency is not None and consistency < POSITION_CONSISTENCY_MIN,
        "length_bias": longer_rate is not None and length_decided >= 5 and longer_rate > LENGTH_PREFERENCE_MAX,
        "unparsed": sum(v is None for v in verdicts),
        "usable_pairs": len(usable),
        "items": items,
    }


# ---------------------------------------------------------------------------------------------------------------
# From recipe settings and run results


def make_judge(*, model: str | None = None, url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               max_new_tokens: int = 256) -> tuple[Ask, str]:
    """A judge from settings: `url` (+ `model`, the served model's name) for an OpenAI-compatible endpoint, else
    `model` as anything tuneforge loads (hub id, folder, run directory, embedded:...). -> (ask, description)"""
    from tuneforge.errors import RecipeError

    if url:
        if not model:
            raise RecipeError(["`eval.judge.model`: an endpoint judge needs the served model's name"])
        return openai_judge(url, model, api_key_env=api_key_env, max_tokens=max_new_tokens), f"{url} ({model})"
    if not model:
        raise RecipeError(["`eval.judge`: give `model` (a model tuneforge can load) or `url` (+ `model`)"])
    from tuneforge.models import load_target

    judge_model, tokenizer = load_target(model)
    return local_judge(judge_model, tokenizer, max_new_tokens=max_new_tokens), model


def judge_results(ask: Ask, results: dict[str, dict], *, rubric: str = DEFAULT_RUBRIC, pair: tuple[str, str] = ("base", "tuned"),
                  max_examples: int | None = None, description: str = "") -> dict:
    """Judge saved evaluation results (as evaluate_generation returns them, keyed base / few_shot / tuned).

    -> {"judge": description, "rubric", "pairwise": compare_answers(pair[0] vs pair[1]) when both are present,
        "grades": {key: grade_answers(...)} for each result}; what the report reads from eval/judge.json.
    """
    out: dict = {"judge": description, "rubric": rubric, "grades": {}}
    for key, result in results.items():
        samples = (result or {}).get("samples", [])[: max_examples or None]
        if samples:
            out["grades"][key] = grade_answers(ask, [s.get("question") or s["prompt"] for s in samples],
                                               [s["prediction"] for s in samples], [s["reference"] for s in samples],
                                               rubric=rubric)
    x, y = pair
    if (results.get(x) or {}).get("samples") and (results.get(y) or {}).get("samples"):
        xs = results[x]["samples"][: max_examples or None]
        ys = results[y]["samples"][: len(xs)]
        out["pairwise"] = compare_answers(ask, [s.get("question") or s["prompt"] for s in xs],
                                          [s["prediction"] for s in xs], [s["prediction"] for s in ys],
                                          [s["reference"] for s in xs], rubric=rubric, names=pair)
    return out
