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
    assert len(items) == 40 and len({i["id"] for i in items}) == 40
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and item["answer"] in range(4)
    # answers spread over the positions, so always picking one letter scores 25%
    assert sorted({i["answer"] for i in items}) == [0, 1, 2, 3]
    assert len({i["subject"] for i in items}) >= 5
    instructions = load_instruction_items()
    assert len(instructions) >= 5 and all("regex" in i["check"] for i in instructions)


def test_cached_scoring_equals_one_sequence_per_option(tiny):
    model, tokenizer = tiny
    items = load_probe_items()[:10]
    cached = option_logprobs(model, tokenizer, items, batch_size=4)
    full = option_logprobs(model, tokenizer, items, shared_prompt=False)
    for a, b in zip(cached, full):
        assert a == pytest.approx(b, abs=1e-3)
        assert all(v < 0 for v in a)


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
    result = run_probe(model, tokenizer, items=load_probe_items()[:8], max_new_tokens=4)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 100 and 0 <= result["accuracy_norm"] <= 100
    assert len(result["items"]) == 8 and set(result["per_subject"]) <= {i["subject"] for i in load_probe_items()}
    assert result["instructions"]["n"] == len(load_instruction_items())
    json.dumps(result)  # saved as eval/forgetting.json


def test_compare_flags_a_drop_over_the_threshold():
    def result(correct: list[bool], instructions: float):
        return {"accuracy": 100.0 * sum(correct) / len(correct), "accuracy_norm": 50.0, "n": len(correct),
                "per_subject": {"math": 50.0}, "instructions": {"pass_rate": instructions},
                "items": [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)]}

    before = result([True] * 8 + [False] * 2, 75.0)  # 80%
    small = result([True] * 7 + [False] * 2 + [True], 75.0)  # 80%: one lost, one gained
    big = result([True] * 6 + [False] * 4, 75.0)  # 60%
    assert compare(before, small)["flagged"] is False
    cmp = compare(before, small)
    assert cmp["lost"] == ["q7"] and cmp["gained"] == ["q9"]
    flagged = compare(before, big, threshold=5.0)
    assert flagged["flagged"] and flagged["scores"]["accuracy"]["delta"] == pytest.approx(-20.0)
    assert "possible forgetting" in flagged["message"]
    assert compare(before, big, threshold=25.0)["flagged"] is False
    assert compare(before, result([True] * 8 + [False] * 2, 50.0))["scores"]["instructions"]["flagged"]


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
    items = [{"question": i["question"], "choices": i["choices"], "answer": i["answer"]} for i in load_probe_items()[:12]]
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
    assert result["scores"]["lm_eval:arc_easy"] == {"before": 60.0, "after": 51.0, "delta": -9.0, "flagged": True}
    assert result["flagged"] and "lm_eval:arc_easy fell 9.0 points" in result["message"]
    assert main_score({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}) == ("acc_norm", 75.0)
    recipe = parse_recipe({"name": "t", "data": {"train": "x.jsonl"}, "eval": {"lm_eval_tasks": ["arc_easyy"]}})
    with pytest.raises(RecipeError, match=r"eval.lm_eval_tasks.0.*no task 'arc_easyy'.*did you mean.*arc_easy"):
        check_tasks(recipe)
