"""Train/eval overlap by normalised hash: counts per level, examples shown, normalisation honoured."""

from __future__ import annotations

from tuneforge.evaluate.contamination import contamination_report, describe, example_hashes


def chat(question: str, answer: str, where: str = "") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "where": where}


TRAIN = [chat("What is 2+2?", "4"), chat("Capital of France?", "Paris"), chat("Colour of the sky?", "Blue"),
         chat("Largest planet?", "Jupiter")]


def test_clean_eval_set_has_no_overlap():
    report = contamination_report(TRAIN, [chat("Smallest planet?", "Mercury"), chat("Capital of Peru?", "Lima")])
    assert report["train"] == 4 and report["eval"] == 2
    assert report["exact"]["count"] == report["prompt"]["count"] == report["answer"]["count"] == 0
    assert not report["contaminated"]
    assert "none of 2" in describe(report)


def test_exact_prompt_and_answer_overlap_are_counted_separately():
    evaluation = [
        chat("  what is 2+2?  ", "4", where="eval.jsonl:1"),  # exact copy up to case and whitespace
        chat("Capital of France?!", "It is Paris.", where="eval.jsonl:2"),  # same prompt (punctuation folded), new answer
        chat("Which planet is biggest?", "jupiter", where="eval.jsonl:3"),  # only the answer repeats
        chat("Smallest planet?", "Mercury", where="eval.jsonl:4"),  # clean
    ]
    report = contamination_report(TRAIN, evaluation)
    assert report["exact"]["count"] == 1 and report["exact"]["examples"][0]["eval_index"] == 0
    assert report["exact"]["examples"][0]["where"] == "eval.jsonl:1"
    assert report["prompt"]["count"] == 2  # the exact copy shares its prompt too
    assert {e["eval_index"] for e in report["prompt"]["examples"]} == {0, 1}
    assert report["answer"]["count"] == 2  # "4" and "jupiter"
    assert report["exact"]["percent"] == 25.0
    assert report["contaminated"] is True
    assert "1 of 4 eval examples are exact copies" in describe(report)
    assert len(report["eval_hashes"]) == 4


def test_system_message_is_not_part_of_the_prompt_hash_and_examples_are_capped():
    with_system = {"messages": [{"role": "system", "content": "Be brief."}] + TRAIN[0]["messages"]}
    assert example_hashes(with_system)["prompt"] == example_hashes(TRAIN[0])["prompt"]
    assert example_hashes(with_system)["exact"] != example_hashes(TRAIN[0])["exact"]
    report = contamination_report(TRAIN, [TRAIN[0]] * 9, show=3)
    assert report["exact"]["count"] == 9 and len(report["exact"]["examples"]) == 3


def test_plain_text_examples():
    report = contamination_report([{"text": "Hello World"}], [{"text": "hello   world"}, {"text": "other"}])
    assert report["exact"]["count"] == 1 and report["answer"]["count"] == 0
