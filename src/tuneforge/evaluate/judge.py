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

`judge_run` does what a recipe's `eval.judge` section (evaluate/judge_section.py) asks on a run's held-out answers,
base vs tuned: the tuned model's win rate with its 95% interval, and the bias measurements beside it; the result is
what eval/judge.json holds (and what `tuneforge rate --import` compares people's ratings with).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable

from tuneforge.evaluate.intervals import mean_interval, wilson
from tuneforge.evaluate.judge_section import DEFAULT_RUBRIC  # the section (eval.judge) owns the default rubric

Ask = Callable[[str], str]


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
                             fix="check eval.judge.url, eval.judge.model_name (the served model) and that the "
                                 f"variable eval.judge.api_key_env names ({api_key_env}) holds the key") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ModelError(f"cannot reach the judge endpoint {endpoint}: {exc}", where="eval.judge.url",
                             fix="check eval.judge.url and that the server is running") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"judge endpoint {endpoint} returned no choices[0].message.content: {str(reply)[:300]}",
                             where="eval.judge.url", fix="eval.judge.url must be an OpenAI-compatible chat API "
                             "(.../v1)") from None

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
        longer answer, or None; each rate with its Wilson 95% interval ("first_position_ci95" over
        "decisive_verdicts", "longer_preferred_ci95" over "length_decided_pairs"; fractions, None when empty),
        "position_bias": bool, "length_bias": bool, "unparsed": verdicts with no [[X]],
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
        "first_position_ci95": wilson(first_wins, decisive), "decisive_verdicts": decisive,
        "longer_preferred_rate": longer_rate,
        "longer_preferred_ci95": wilson(longer_wins, length_decided), "length_decided_pairs": length_decided,
        "position_bias": consistency is not None and consistency < POSITION_CONSISTENCY_MIN,
        "length_bias": longer_rate is not None and length_decided >= 5 and longer_rate > LENGTH_PREFERENCE_MAX,
        "unparsed": sum(v is None for v in verdicts),
        "usable_pairs": len(usable),
        "items": items,
    }


# ---------------------------------------------------------------------------------------------------------------
# From recipe settings and run results


def make_judge(*, model: str | None = None, url: str | None = None, model_name: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 256) -> tuple[Ask, str]:
    """A judge from settings (eval.judge): `url` + `model_name` (the served model's name) for an OpenAI-compatible
    endpoint, or `model`, anything tuneforge loads (hub id, folder, run directory, embedded:...). -> (ask, description)"""
    from tuneforge.errors import RecipeError

    if url and model:
        raise RecipeError(["`eval.judge`: give `model` (a model tuneforge loads) or `url` (an endpoint, with "
                           "`model_name`), not both"])
    if url:
        if not model_name:
            raise RecipeError(["`eval.judge.model_name`: an endpoint judge needs the served model's name "
                               "(e.g. model_name: gpt-4o-mini)"])
        ask = openai_judge(url, model_name, api_key_env=api_key_env, max_tokens=max_new_tokens)
        return ask, f"{url} ({model_name})"
    if not model:
        raise RecipeError(["`eval.judge`: give `model` (a model tuneforge can load) or `url` + `model_name` (an "
                           "OpenAI-compatible endpoint)"])
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


# ---------------------------------------------------------------------------------------------------------------
# eval.judge on a run


def win_rate(wins: int, ties: int, losses: int) -> dict:
    """Tuned-vs-base preference counts -> {"wins", "ties", "losses", "n", "decided_rate": % of decided pairs won,
    "ci95": its Wilson 95% interval in %, "ties_half_rate": % counting a tie as half a win, "ties_half_ci95"
    (bootstrap over pairs), "verdict": "tuned better" | "base better" | "no clear difference"} (the verdict
    needs the decided pairs' interval to exclude 50%). Shared by the judge and the people's ratings (tuneforge rate)."""
    decided, n = wins + losses, wins + ties + losses
    interval = wilson(wins, decided)
    ci = [100.0 * interval[0], 100.0 * interval[1]] if interval else None
    halves = mean_interval([100.0] * wins + [50.0] * ties + [0.0] * losses)
    verdict = "no clear difference"
    if ci and ci[0] > 50.0:
        verdict = "tuned better"
    elif ci and ci[1] < 50.0:
        verdict = "base better"
    return {"wins": wins, "ties": ties, "losses": losses, "n": n,
            "decided_rate": 100.0 * wins / decided if decided else None, "ci95": ci,
            "ties_half_rate": halves["mean"], "ties_half_ci95": halves["ci95"], "verdict": verdict}


def judge_inputs(baseline: dict, tuned: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    """(prompts, base answers, tuned answers, references) from a run's eval/baseline.json and eval/tuned.json (as
    evaluate_generation writes them; the i-th sample of each is the same held-out example)."""
    base_samples, tuned_samples = baseline.get("samples", []), tuned.get("samples", [])
    n = min(len(base_samples), len(tuned_samples))
    prompts = [s.get("question") or s["prompt"] for s in tuned_samples[:n]]
    return (prompts, [s["prediction"] for s in base_samples[:n]], [s["prediction"] for s in tuned_samples[:n]],
            [s.get("reference") or "" for s in tuned_samples[:n]])


def judge_run(settings, prompts: list[str], base_answers: list[str], tuned_answers: list[str],
              references: list[str] | None = None, *, ask: Ask | None = None, description: str | None = None) -> dict:
    """Judge base vs tuned answers to the same held-out prompts as `settings` (a JudgeSection, eval.judge) says.

    -> {"judge": who judged, "rubric", "n", "settings": the section without secrets,
        "pairwise": compare_answers(...) + {"tuned_win_rate": win_rate(...)} and each item's "index" (its place in
        the run's samples), when settings.pairwise,
        "grades": {"base": grade_answers(...), "tuned": ...} when settings.grade} -- what eval/judge.json holds.
    `ask`: a judge already made (tests, or a caller that keeps one loaded); else it is made from the settings.
    """
    n = min(len(prompts), len(base_answers), len(tuned_answers), settings.max_examples or len(prompts))
    prompts, base_answers, tuned_answers = prompts[:n], base_answers[:n], tuned_answers[:n]
    references = (references or [None] * n)[:n]
    references = [r or None for r in references]
    if ask is None:
        ask, made = make_judge(model=settings.model, url=settings.url, model_name=settings.model_name,
                               api_key_env=settings.api_key_env, max_new_tokens=settings.max_new_tokens)
        description = description or made
    out: dict = {"judge": description or "", "rubric": settings.rubric, "n": n,
                 "settings": settings.model_dump(exclude={"rubric"}), "grades": {}}
    if settings.pairwise:
        pair = compare_answers(ask, prompts, base_answers, tuned_answers, references, rubric=settings.rubric,
                               names=("base", "tuned"))
        for index, item in enumerate(pair["items"]):
            item["index"] = index
        wins = pair["wins"]
        pair["tuned_win_rate"] = win_rate(wins["tuned"], wins["tie"], wins["base"])
        out["pairwise"] = pair
    if settings.grade:
        for name, answers in (("base", base_answers), ("tuned", tuned_answers)):
            out["grades"][name] = grade_answers(ask, prompts, answers, references, rubric=settings.rubric)
    return out

