"""Forgetting probe, held-out loss and the few-shot baseline, on the tiny random model (fast)."""

from __future__ import annotations

import json
import math

import pytest

from tuneforge.evaluate.baselines import baseline_table, few_shot_examples, few_shot_messages, with_few_shot
from tuneforge.evaluate.forgetting import compare, load_instruction_items, load_probe_items, option_logprobs, run_probe
from tuneforge.evaluate.loss import mean_loss


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    return model, smol_tokenizer


# -- the shipped probe ----------------------------------------------------------------------------------------------


def test_probe_assets_are_well_formed():
    items = load_probe_items()
    assert 400 <= len(items) <= 600 and len({i["id"] for i in items}) == len(items)
    assert len({(i["question"], i["choices"][i["answer"]]) for i in items}) == len(items)  # no repeated item
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and item["answer"] in range(4)
        assert item["skill"] and item["subject"] and len(item["question"]) <= 120
    skills = {}
    for item in items:
        skills.setdefault(item["skill"], []).append(item["answer"])
    assert len(skills) >= 12 and min(len(v) for v in skills.values()) >= 20
    for answers in skills.values():  # the right answer equally often in each position, within each skill
        assert max(answers.count(k) for k in range(4)) - min(answers.count(k) for k in range(4)) <= 1
    instructions = load_instruction_items()
    assert len(instructions) >= 5 and all("regex" in i["check"] for i in instructions)
    quick = load_probe_items(per_skill=3)
    assert len(quick) == 3 * len(skills) and quick == [i for i in items if int(i["id"].rsplit("-", 1)[1]) <= 3]


def _make_probe_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_probe.py"
    spec = importlib.util.spec_from_file_location("make_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_probe_is_what_the_script_writes(tmp_path):
    module = _make_probe_module()
    assert module.make_items() == load_probe_items()
    assert module.make_items(seed=1) != load_probe_items()  # the seed matters; the default one is pinned


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTH_DAYS = {"January": 31, "February": 28, "March": 31, "April": 30, "May": 31, "June": 30, "July": 31,
              "August": 31, "September": 30, "October": 31, "November": 30, "December": 31}
FACTORS = {("centimetres", "metres"): 100, ("metres", "kilometres"): 1000, ("grams", "kilograms"): 1000,
           ("minutes", "hours"): 60, ("seconds", "minutes"): 60, ("hours", "days"): 24, ("days", "weeks"): 7,
           ("millilitres", "litres"): 1000, ("months", "years"): 12, ("eggs", "dozen"): 12}
KNOWN = {"What is the capital of France?": "Paris", "What is the capital of Japan?": "Tokyo",
         "What is the capital of Canada?": "Ottawa", "What is the capital of Australia?": "Canberra",
         "What is the capital of Kenya?": "Nairobi", "On which continent is Peru?": "South America",
         "On which continent is Ghana?": "Africa", "What is the opposite of 'hot'?": "cold",
         "What is the opposite of 'empty'?": "full", "What is the plural of 'mouse'?": "mice",
         "What is the plural of 'child'?": "children", "What is the past tense of 'go'?": "went",
         "What is the past tense of 'buy'?": "bought", "How many legs does a spider have?": "8",
         "How many legs does a bee have?": "6", "What is a baby cat called?": "kitten",
         "Which animal says 'moo'?": "cow"}


def _expected(item: dict) -> str | None:
    """The answer to an item worked out here, independently of scripts/make_probe.py (None: not checked here)."""
    import re

    q = item["question"]
    listed = re.search(r": (.+), (.+), (.+) or (.+)\?$", q)
    if m := re.fullmatch(r"What is (\d+) (\+|-|times|divided by) (\d+)\?", q):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "times": a * b, "divided by": a // b}[op])
    if m := re.fullmatch(r"\w+ has (\d+) \w+ and (gets|gives away) (\d+).*", q):
        return str(int(m[1]) + int(m[3]) if m[2] == "gets" else int(m[1]) - int(m[3]))
    if m := re.fullmatch(r"\w+ buys (\d+) bags with (\d+) .*", q):
        return str(int(m[1]) * int(m[2]))
    if m := re.fullmatch(r"\w+ shares (\d+) \w+ equally among (\d+) friends.*", q):
        return str(int(m[1]) // int(m[2]))
    if (m := re.fullmatch(r"Which number is the (largest|smallest): .*", q)) and listed:
        return str((max if m[1] == "largest" else min)(int(v) for v in listed.groups()))
    if m := re.fullmatch(r"Which (number|letter) comes next: (.+), \.\.\.\?", q):
        seq = m[2].split(", ")
        if m[1] == "letter":
            return chr(2 * ord(seq[3]) - ord(seq[2]))
        v = [int(x) for x in seq]
        return str(v[3] * 2 if v[1] == 2 * v[0] and v[2] == 2 * v[1] else 2 * v[3] - v[2])
    if m := re.fullmatch(r"How many (\w+) are in (\d) (\w+)\?", q):
        return str(int(m[2]) * FACTORS[(m[1], m[3])])
    if m := re.fullmatch(r"Which is the (\w+) month of the year\?", q):
        ordinals = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()
        return list(MONTH_DAYS)[ordinals.index(m[1])]
    if m := re.fullmatch(r"Today is (\w+)\. What day (will it be|was it) (.+)\?", q):
        n = {"tomorrow": 1, "yesterday": 1}.get(m[3]) or int(re.search(r"\d+", m[3])[0])
        return DAYS[(DAYS.index(m[1]) + (n if m[2] == "will it be" else -n)) % 7]
    if m := re.fullmatch(r"How many days are in (\w+) \(not in a leap year\)\?", q):
        return str(MONTH_DAYS[m[1]])
    if m := re.fullmatch(r"Which month comes right (after|before) (\w+)\?", q):
        months = list(MONTH_DAYS)
        return months[(months.index(m[2]) + (1 if m[1] == "after" else -1)) % 12]
    if m := re.fullmatch(r"How many letters are in the word '(\w+)'\?", q):
        return str(len(m[1]))
    if m := re.fullmatch(r"What is the (first|last) letter of the word '(\w+)'\?", q):
        return m[2][0 if m[1] == "first" else -1]
    if m := re.fullmatch(r"What is '(\w+)' written backwards\?", q):
        return m[1][::-1]
    if m := re.fullmatch(r"Which letter comes right (after|before) '(\w)' in the alphabet\?", q):
        return chr(ord(m[2]) + (1 if m[1] == "after" else -1))
    if m := re.fullmatch(r"(\w+) is (\w+) than (\w+)\. (\w+) is \2 than (\w+)\. Who is the (\w+)\?", q):
        pairs = [(m[1], m[3]), (m[4], m[5])]
        names = {n for pair in pairs for n in pair}
        most = next(n for n in names if all(n != low for _, low in pairs))
        least = next(n for n in names if all(n != high for high, _ in pairs))
        return most if m[6] in ("tallest", "oldest", "fastest") else least
    if m := re.fullmatch(r"All \w+ are (\w+)\. .*", q):
        return m[1]
    if m := re.fullmatch(r"On (\w+), (\w+) went to the (\w+) with (\w+) and bought (\d) (\w+)\. (.+)", q):
        day, _, place, friend, n, item, asked = m.groups()
        return {"On which day?": day, "Where": f"the {place}", "Who": friend, "How": n, "What": item}.get(
            asked if asked == "On which day?" else asked.split()[0])
    return KNOWN.get(q)


def test_probe_answers_are_right():
    items = load_probe_items()
    checked = {}
    for item in items:
        expected = _expected(item)
        if expected is not None:
            assert item["choices"][item["answer"]] == expected, item
            checked[item["skill"]] = checked.get(item["skill"], 0) + 1
    computed = ("arithmetic", "word_problems", "number_comparison", "sequences", "unit_conversion", "calendar",
                "letters", "logic", "reading")
    for skill in computed:  # every item of the computed skills
        assert checked[skill] == sum(1 for i in items if i["skill"] == skill), skill
    assert sum(checked.values()) - sum(checked[s] for s in computed) >= 8  # and the facts known here that occur


def test_cached_scoring_equals_one_sequence_per_option(tiny):
    model, tokenizer = tiny
    items = load_probe_items()
    sample = [i for skill in sorted({i["skill"] for i in items}) for i in [x for x in items if x["skill"] == skill][:2]]
    cached = option_logprobs(model, tokenizer, sample, batch_size=5)  # one-token and longer options, mixed batches
    full = option_logprobs(model, tokenizer, sample, shared_prompt=False)
    for a, b in zip(cached, full):
        assert a == pytest.approx(b, abs=1e-3)
        assert all(v < 0 for v in a)
    one_token = [{"id": "x", "question": "Pick a letter.", "choices": ["a", "b", "c", "d"], "answer": 0}]
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in one_token[0]["choices"])
    assert option_logprobs(model, tokenizer, one_token)[0] == pytest.approx(
        option_logprobs(model, tokenizer, one_token, shared_prompt=False)[0], abs=1e-3)


def test_option_scoring_picks_the_likely_option(tiny):
    """A model whose logits come from a lookup that loves one token must pick the option made of that token."""
    import torch

    model, tokenizer = tiny
    favourite = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    items = [{"id": "x", "question": "Pick one.", "choices": ["no", " yes", "maybe", "never"], "answer": 1}]

    class Loving(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):  # as a PEFT wrapper does
            return self.inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.logits[..., favourite[0]] += 50.0
            return out

    scores = option_logprobs(Loving(model), tokenizer, items)[0]
    assert max(range(4), key=lambda j: scores[j]) == 1


def test_run_probe_shape(tiny):
    model, tokenizer = tiny
    items = [i for i in load_probe_items() if i["skill"] in ("geography", "letters")][:8]
    result = run_probe(model, tokenizer, items=items, max_new_tokens=4)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 100 and 0 <= result["accuracy_norm"] <= 100
    assert [r["id"] for r in result["items"]] == [i["id"] for i in items]  # item order kept
    assert result["item_scores"] == [100.0 if r["correct"] else 0.0 for r in result["items"]]
    assert sum(result["item_scores"]) / 8 == pytest.approx(result["accuracy"])
    assert set(result["per_skill"]) == {i["skill"] for i in items} and set(result["per_subject"]) <= {"knowledge", "language"}
    assert result["instructions"]["n"] == len(load_instruction_items())
    json.dumps(result)  # saved as eval/forgetting.json


def _result(correct: list[bool], instructions: list[bool] | None = None, skills: list[str] | None = None) -> dict:
    skills = skills or ["math"] * len(correct)
    items = [{"id": f"q{i}", "skill": s, "subject": s, "correct": c, "correct_norm": c}
             for i, (c, s) in enumerate(zip(correct, skills))]
    per_skill = {s: 100.0 * sum(c for c, k in zip(correct, skills) if k == s) / skills.count(s) for s in set(skills)}
    out = {"accuracy": 100.0 * sum(correct) / len(correct), "accuracy_norm": 100.0 * sum(correct) / len(correct),
           "n": len(correct), "per_subject": per_skill, "per_skill": per_skill, "items": items,
           "item_scores": [100.0 * c for c in correct]}
    if instructions is not None:
        out["instructions"] = {"pass_rate": 100.0 * sum(instructions) / len(instructions),
                               "items": [{"id": f"i{k}", "passed": p} for k, p in enumerate(instructions)]}
    return out


def test_compare_flags_only_a_drop_the_items_support():
    """Hand-computed. 40 items, 4 right before and wrong after, none the other way: delta -10 points; exact McNemar
    p = 2 * 0.5^4 = 0.125. A paired bootstrap resample holds none of the 4 with probability 0.9^40 = 1.5%, below the
    2.5% tail, and one of them with probability 40 * 0.1 * 0.9^39 = 6.6%: so the interval's upper end is one lost item
    in 40, -2.5 points, and the interval excludes zero. 10 items with 2 lost: a resample misses both with probability
    0.8^10 = 10.7%, more than 2.5%, so the interval reaches 0 and a 20-point drop is not flagged."""
    before = _result([True] * 30 + [False] * 10, [True] * 6 + [False] * 2)
    after = _result([False] * 4 + [True] * 26 + [False] * 10, [True] * 6 + [False] * 2)
    result = compare(before, after, threshold=5.0)
    accuracy = result["scores"]["accuracy"]
    assert accuracy["delta"] == pytest.approx(-10.0) and accuracy["n"] == 40
    assert accuracy["ci95"][1] == pytest.approx(-2.5) and accuracy["ci95"][0] < -15.0
    assert accuracy["p_value"] == pytest.approx(0.125) and accuracy["flagged"] is True
    assert result["scores"]["instructions"] == {"before": 75.0, "after": 75.0, "delta": 0.0, "ci95": [0.0, 0.0], "n": 8,
                                                "p_value": 1.0, "flagged": False}
    assert result["flagged"] and result["lost"] == ["q0", "q1", "q2", "q3"] and result["gained"] == []
    assert result["message"].startswith("possible forgetting: accuracy fell 10.0 points (75.0 -> 65.0, 95% CI [")
    assert compare(before, after, threshold=12.0)["flagged"] is False  # real, but not larger than the threshold

    small_before, small_after = _result([True] * 8 + [False] * 2), _result([False] * 2 + [True] * 6 + [False] * 2)
    small = compare(small_before, small_after, threshold=5.0)
    assert small["scores"]["accuracy"]["delta"] == pytest.approx(-20.0) and small["scores"]["accuracy"]["ci95"][1] == 0.0
    assert small["flagged"] is False and "can tell from noise" in small["message"]
    same = compare(before, before)
    assert same["scores"]["accuracy"]["ci95"] == [0.0, 0.0] and same["message"] == "no drop larger than 5 points"


def test_compare_per_skill_intervals_are_paired_within_the_skill():
    skills = ["geo"] * 4 + ["math"] * 4
    before = _result([True, True, True, True, False, False, True, True], skills=skills)
    after = _result([False, False, False, False, False, True, True, True], skills=skills)  # geo -100, math +25
    result = compare(before, after)
    assert result["per_skill"]["geo"] == {"before": 100.0, "after": 0.0, "delta": -100.0, "ci95": [-100.0, -100.0]}
    assert result["per_skill"]["math"]["delta"] == 25.0 and result["per_skill"]["math"]["ci95"][0] == 0.0
    assert result["per_subject"]["geo"]["ci95"] == [-100.0, -100.0]
    overall = result["scores"]["accuracy"]  # 4 lost and 1 gained of 8 items: the interval reaches zero, no flag
    assert overall["delta"] == pytest.approx(-37.5) and overall["ci95"][1] >= 0 and not result["flagged"]


def test_compare_reads_results_without_per_item_scores():
    """Older eval/forgetting.json files and lm-eval rows: deltas without an interval, flagged on the threshold."""
    old = {"accuracy": 60.0, "accuracy_norm": 55.0, "per_subject": {"science": 70.0}}
    new = {"accuracy": 50.0, "accuracy_norm": 54.0, "per_subject": {"science": 60.0}}
    result = compare(old, new)
    assert result["scores"]["accuracy"] == {"before": 60.0, "after": 50.0, "delta": -10.0, "ci95": None, "flagged": True}
    assert result["per_subject"]["science"] == {"before": 70.0, "after": 60.0, "delta": -10.0, "ci95": None}
    assert "no interval: no per-item scores" in result["message"]


# -- held-out loss ---------------------------------------------------------------------------------------------------


def test_mean_loss_matches_transformers_and_ignores_masked_tokens(tiny):
    import torch

    model, _ = tiny
    ids = list(range(100, 120))
    labels = [-100] * 12 + ids[12:]
    result = mean_loss(model, [{"input_ids": ids, "labels": labels}])
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert result["loss"] == pytest.approx(reference, rel=1e-5)
    assert result["tokens"] == 8 and result["perplexity"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_mean_loss_is_token_weighted_and_batch_independent(tiny):
    model, _ = tiny
    examples = [{"input_ids": list(range(50, 50 + n)), "labels": [-100] * 3 + list(range(53, 50 + n))} for n in (6, 15, 9, 30)]
    one = mean_loss(model, examples, batch_size=1)
    three = mean_loss(model, examples, batch_size=3)
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-5)
    assert one["tokens"] == sum(n - 3 for n in (6, 15, 9, 30)) and one["examples"] == 4


# -- few-shot baseline --------------------------------------------------------------------------------------------------


def chat(q, a, system=None):
    return {"messages": ([{"role": "system", "content": system}] if system else []) +
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


TRAIN = [chat(f"q{i}", f"a{i}", system="sys") for i in range(10)] + [{"text": "plain"}]


def test_few_shot_messages_are_seeded_alternating_turns():
    shots = few_shot_messages(TRAIN, 3, seed=1)
    assert [m["role"] for m in shots] == ["user", "assistant"] * 3
    assert all(m["role"] != "system" for m in shots)
    assert few_shot_messages(TRAIN, 3, seed=1) == shots and few_shot_messages(TRAIN, 3, seed=2) != shots
    assert few_shot_messages(TRAIN, 0, seed=0) == [] and len(few_shot_messages(TRAIN, 50, seed=0)) == 20
    assert len(few_shot_messages(TRAIN, 5, seed=0, max_chars=9)) == 4  # 4 characters a shot: two fit in 9


def test_shots_go_after_the_system_message_and_before_the_question():
    shots = few_shot_messages(TRAIN, 2, seed=0)
    example = chat("real question", "real answer", system="be brief")
    out = with_few_shot(example, shots)
    assert out["messages"][0]["content"] == "be brief" and out["messages"][1:5] == shots
    assert out["messages"][-2:] == example["messages"][-2:] and len(example["messages"]) == 3  # original untouched
    no_system = with_few_shot(chat("q", "a"), shots)
    assert no_system["messages"][:4] == shots
    text = with_few_shot({"messages": chat("Q:", "A")["messages"], "raw_prompt_completion": True}, shots, as_text=True)
    assert text["messages"][0]["content"].startswith(shots[0]["content"] + shots[1]["content"] + "\n\n")
    assert text["messages"][0]["content"].endswith("Q:") and len(text["messages"]) == 2
    both = few_shot_examples([example, example], TRAIN, k=2, seed=0)
    assert both[0]["messages"] == both[1]["messages"]


def test_baseline_table():
    table = baseline_table({"base": {"metrics": {"em": 10.0}}, "few_shot": None, "tuned": {"metrics": {"em": 90.0, "f1": 5.0}}})
    assert table == {"em": {"base": 10.0, "few_shot": None, "tuned": 90.0}, "f1": {"base": None, "few_shot": None, "tuned": 5.0}}


def test_local_judge_answers_through_the_chat_template(tiny):
    from tuneforge.evaluate.judge import compare_answers, local_judge

    model, tokenizer = tiny
    ask = local_judge(model, tokenizer, max_new_tokens=4)
    assert isinstance(ask("Say hi"), str)
    result = compare_answers(ask, ["q1", "q2"], ["a", "b"], ["c", "d"])  # a random model gives no verdicts: all ties
    assert result["n"] == 2 and sum(result["wins"].values()) == 2 and result["unparsed"] <= 4


def test_evaluate_generation_keeps_question_and_per_example_scores(tiny):
    from tuneforge.evaluate.scoring import evaluate_generation

    model, tokenizer = tiny
    examples = [chat("What is 2+2?", "4", system="sys"), chat("Capital of France?", "Paris")]
    result = evaluate_generation(model, tokenizer, examples, metrics=["exact_match", {"name": "regex", "pattern": "."}],
                                 max_examples=None, max_new_tokens=3, batch_size=2)
    assert result["n"] == 2 and set(result["metrics"]) == {"exact_match", "regex"}
    first = result["samples"][0]
    assert first["question"] == "What is 2+2?" and first["reference"] == "4"
    assert set(first["scores"]) == {"exact_match", "regex"} and first["scores"]["exact_match"] in (0.0, 1.0)


# -- lm-evaluation-harness tasks (eval.lm_eval_tasks) ---------------------------------------------------------------


def _local_lm_eval_task(folder, items) -> str:
    """A multiple-choice lm-eval task on a local JSONL file (offline), in `folder`."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    (folder / "tf_local_mc.yaml").write_text(
        "task: tf_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    return "tf_local_mc"


def test_lm_eval_task_scores_like_a_direct_log_likelihood_count(tiny, tmp_path):
    """The wiring (in-memory model, tokenizer, limit) is right when lm-eval's accuracy equals the same choice made by
    hand: the option whose ' choice' continuation has the highest summed log-probability after the question."""
    import torch

    from tuneforge.evaluate.lm_eval_tasks import check_tasks, run_tasks
    from tuneforge.recipe import parse_recipe

    model, tokenizer = tiny
    items = [{"question": i["question"], "choices": i["choices"], "answer": i["answer"]}
             for i in load_probe_items() if i["skill"] == "geography"][:12]
    task = _local_lm_eval_task(tmp_path, items)
    recipe = parse_recipe({"name": "t", "data": {"train": "x.jsonl"},
                           "eval": {"lm_eval_tasks": [task], "lm_eval_include": str(tmp_path), "lm_eval_limit": 10}})
    model.train()  # whatever mode the model is in, run_tasks scores in eval mode and gives the model back as it was
    scores = run_tasks(model, tokenizer, recipe, check_tasks(recipe))
    assert model.training is True
    model.eval()

    def logp(context, continuation):
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
        return sum(logits[i - 1, whole[i]].item() for i in range(n, len(whole)))

    right = 0
    for item in items[:10]:
        context = f"Question: {item['question']}\nAnswer:"
        options = [logp(context, " " + choice) for choice in item["choices"]]
        right += max(range(len(options)), key=options.__getitem__) == item["answer"]
    assert scores == {task: {"metric": "acc", "score": pytest.approx(100.0 * right / 10)}}
    assert model.training is False


def test_lm_eval_scores_join_the_forgetting_comparison_and_unknown_tasks_are_named():
    from tuneforge.errors import RecipeError
    from tuneforge.evaluate.lm_eval_tasks import check_tasks, main_score
    from tuneforge.recipe import parse_recipe

    before = {"accuracy": 50.0, "lm_eval": {"arc_easy": {"metric": "acc_norm", "score": 60.0}}}
    after = {"accuracy": 49.0, "lm_eval": {"arc_easy": {"metric": "acc_norm", "score": 51.0}}}
    result = compare(before, after, threshold=5)
    assert result["scores"]["lm_eval:arc_easy"] == {"before": 60.0, "after": 51.0, "delta": -9.0, "ci95": None,
                                                     "flagged": True}
    assert result["flagged"] and "lm_eval:arc_easy fell 9.0 points (60.0 -> 51.0, no interval" in result["message"]
    assert main_score({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}) == ("acc_norm", 75.0)
    recipe = parse_recipe({"name": "t", "data": {"train": "x.jsonl"}, "eval": {"lm_eval_tasks": ["arc_easyy"]}})
    with pytest.raises(RecipeError, match=r"eval.lm_eval_tasks.0.*no task 'arc_easyy'.*did you mean.*arc_easy"):
        check_tasks(recipe)
