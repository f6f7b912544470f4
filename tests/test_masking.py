"""Templating and loss masks per format, checked on exactly the tokens that carry loss.

Every test decodes the loss-carrying tokens (`loss_text`) of examples as `prepare_data` produces them for training
and compares them with what must be learned: each assistant turn's content followed by the end-of-turn token
<|im_end|> (SmolLM2's ChatML template), nothing from system or user turns; for a tokenizer without a chat template
the completion + EOS; for CPT every token, EOS appended.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tuneforge.data.pipeline import prepare_data
from tuneforge.data.preview import loss_text
from tuneforge.data.template import (
    IGNORE_INDEX,
    end_of_turn_token_id,
    prompt_for_generation,
    render_chat,
    tokenize_chat,
    tokenize_example,
)
from tuneforge.errors import DataError
from tuneforge.recipe import parse_recipe

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    from tuneforge.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same vocabulary with no chat template, like a base model's tokenizer."""
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = None
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# A held-out file of one (unrelated) example, so prepare_data keeps every training example, in order.
EVAL_ROWS = {
    "messages": [{"messages": [{"role": "user", "content": "eval q"}, {"role": "assistant", "content": "eval a"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "eval q"}, {"from": "gpt", "value": "eval a"}]}],
    "alpaca": [{"instruction": "eval q", "input": "", "output": "eval a"}],
    "prompt_completion": [{"prompt": "eval q", "completion": "eval a"}],
    "text": [{"text": "an eval document"}],
}


def prepared(tmp_path, tokenizer, rows, fmt, *, method="sft", max_length=512, **data):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS[fmt])
    recipe = parse_recipe({"name": "t", "method": method,
                           "data": {"train": str(train), "eval": str(held), "format": "auto", **data},
                           "train": {"max_length": max_length}})
    result = prepare_data(recipe, tokenizer)
    assert result.stats.format == fmt
    assert len(result.train) == len(rows)
    return result


def assert_labels_are_ids_or_ignored(item):
    assert len(item.labels) == len(item.input_ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(item.input_ids, item.labels))


# --- one test per format -------------------------------------------------------------------------------------


def test_messages_with_system_and_multi_turn(tmp_path, tok):
    rows = [
        {"messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "Spain?"},
            {"role": "assistant", "content": "Madrid."},
        ]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]},
    ]
    data = prepared(tmp_path, tok, rows, "messages")
    first, second = data.train
    assert loss_text(tok, first) == f"Paris.{EOT}Rome.{EOT}Madrid.{EOT}"
    assert loss_text(tok, second) == f"Hi!{EOT}"
    for item in data.train:
        assert_labels_are_ids_or_ignored(item)
    # The prompt really is in the sequence (masked), with the given system prompt replacing the template's default.
    full = tok.decode(first.input_ids)
    assert "You answer in one word." in full and "And of Italy?" in full and "SmolLM" not in full
    assert "SmolLM" in tok.decode(second.input_ids)  # the template's default system prompt, masked
    assert data.stats.loss_tokens == first.loss_tokens + second.loss_tokens


def test_every_assistant_turn_is_one_contiguous_run_ending_in_end_of_turn(tmp_path, tok):
    rows = [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"},
    ]}]
    (item,) = prepared(tmp_path, tok, rows, "messages").train
    carries = [label != IGNORE_INDEX for label in item.labels]
    runs = [i for i in range(len(carries)) if carries[i] and (i == 0 or not carries[i - 1])]
    ends = [i for i in range(len(carries)) if carries[i] and (i + 1 == len(carries) or not carries[i + 1])]
    assert len(runs) == len(ends) == 2
    end_id = tok.convert_tokens_to_ids(EOT)
    assert end_of_turn_token_id(tok) == end_id
    assert all(item.input_ids[i] == end_id for i in ends)
    # The user turn's own <|im_end|> does not carry loss.
    user_ends = [i for i, t in enumerate(item.input_ids) if t == end_id and not carries[i]]
    assert len(user_ends) == 3  # default system prompt, user "a", user "b"


def test_sharegpt_conversations(tmp_path, tok):
    rows = [{"conversations": [
        {"from": "system", "value": "Be terse."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "human", "value": "3+3?"},
        {"from": "gpt", "value": "6"},
    ]}]
    (item,) = prepared(tmp_path, tok, rows, "sharegpt").train
    assert loss_text(tok, item) == f"4{EOT}6{EOT}"
    assert "<|im_start|>system\nBe terse." in tok.decode(item.input_ids)
    assert_labels_are_ids_or_ignored(item)


def test_alpaca_instruction_input_output(tmp_path, tok):
    rows = [
        {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ]
    with_input, without_input = prepared(tmp_path, tok, rows, "alpaca").train
    assert loss_text(tok, with_input) == f"fromage{EOT}"
    assert loss_text(tok, without_input) == f"Blue{EOT}"
    assert "<|im_start|>user\nTranslate to French.\n\ncheese<|im_end|>" in tok.decode(with_input.input_ids)
    assert "<|im_start|>user\nName a colour.<|im_end|>" in tok.decode(without_input.input_ids)


def test_prompt_completion_strings_with_a_chat_template(tmp_path, tok):
    rows = [{"prompt": "What is 2+2?", "completion": "4"}]
    (item,) = prepared(tmp_path, tok, rows, "prompt_completion").train
    assert loss_text(tok, item) == f"4{EOT}"
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in tok.decode(item.input_ids)


def test_prompt_completion_message_lists_carry_loss_on_the_completion_only(tmp_path, tok):
    rows = [{
        "prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                   {"role": "user", "content": "Q2"}],
        "completion": [{"role": "assistant", "content": "A2"}],
    }]
    (item,) = prepared(tmp_path, tok, rows, "prompt_completion", system_prompt="Be kind.").train
    assert loss_text(tok, item) == f"A2{EOT}"
    assert "<|im_start|>assistant\nA1<|im_end|>" in tok.decode(item.input_ids)  # context, not target
    assert "<|im_start|>system\nBe kind." in tok.decode(item.input_ids)


def test_prompt_completion_without_chat_template_is_completion_plus_eos(tmp_path, plain_tok):
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Q: 3+3?\nA:", "completion": " 6"}]
    data = prepared(tmp_path, plain_tok, rows, "prompt_completion")
    eos = plain_tok.eos_token
    assert [loss_text(plain_tok, item) for item in data.train] == [f" 4{eos}", f" 6{eos}"]
    assert plain_tok.decode(data.train[0].input_ids) == f"Q: 2+2?\nA: 4{eos}"
    assert data.train[0].input_ids[-1] == plain_tok.eos_token_id


def test_prompt_completion_without_chat_template_and_a_system_prompt(tmp_path, plain_tok):
    """data.system_prompt used to push the prompt into the completion slot: loss was on the prompt."""
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    data = prepared(tmp_path, plain_tok, rows, "prompt_completion", system_prompt="Answer with a number.")
    (item,) = data.train
    eos = plain_tok.eos_token
    assert loss_text(plain_tok, item) == f" 4{eos}"
    assert plain_tok.decode(item.input_ids) == f"Answer with a number.\n\nQ: 2+2?\nA: 4{eos}"
    prompt, reference = prompt_for_generation(plain_tok, data.train_examples[0])
    assert (prompt, reference) == ("Answer with a number.\n\nQ: 2+2?\nA:", " 4")


def test_text_for_cpt_all_tokens_carry_loss_and_eos_is_appended(tmp_path, tok):
    docs = ["The quick brown fox jumps over the lazy dog.", "Second document,\nwith two lines."]
    data = prepared(tmp_path, tok, [{"text": d} for d in docs], "text", method="cpt")
    for item, doc in zip(data.train, docs):
        assert item.labels == item.input_ids
        assert item.input_ids[-1] == tok.eos_token_id
        assert item.input_ids.count(tok.eos_token_id) == 1
        assert loss_text(tok, item) == doc + tok.eos_token
    assert data.stats.loss_tokens == data.stats.train_tokens


# --- token boundaries ----------------------------------------------------------------------------------------

TRICKY_ANSWERS = [" one leading space", "  two leading spaces", "\n\n\nthree newlines first", "\ttab", "trailing space ",
                  "trailing newline\n", "日本語 and emoji 🎉", '{"json": [1, 2]}', "<b>html-ish</b>"]


@pytest.mark.parametrize("answer", TRICKY_ANSWERS)
def test_loss_text_is_exactly_the_answer_for_any_whitespace(tok, answer):
    """A token merging the template's newline with the answer's leading whitespace used to carry loss."""
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
    item = tokenize_example(tok, {"messages": messages}, 512)
    assert loss_text(tok, item) == answer + EOT
    assert tok.decode(item.input_ids) == render_chat(tok, messages, add_generation_prompt=False)


def test_training_prompt_tokens_are_the_inference_prompt_tokens(tok):
    messages = [{"role": "user", "content": "Give two spaces"}, {"role": "assistant", "content": "  like this"}]
    item = tokenize_example(tok, {"messages": messages}, 512)
    prompt, reference = prompt_for_generation(tok, {"messages": messages})
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    first_loss = next(i for i, label in enumerate(item.labels) if label != IGNORE_INDEX)
    assert item.input_ids[:first_loss] == prompt_ids
    assert reference == "  like this"


class DummyPrefixTokenizer:
    """Mimics a SentencePiece tokenizer that puts a space in front of every text it encodes, so tokenizing the
    conversation piece by piece would change it; the masks must then come from one whole-text tokenization."""

    def __init__(self, inner):
        self.inner = inner
        self.chat_template = inner.chat_template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if isinstance(text, list):
            encodings = [self(t, add_special_tokens, return_offsets_mapping) for t in text]
            return {key: [e[key] for e in encodings] for key in encodings[0]}
        encoding = self.inner(" " + text, add_special_tokens=add_special_tokens,
                              return_offsets_mapping=return_offsets_mapping)
        out = {"input_ids": encoding["input_ids"]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(max(0, s - 1), max(0, e - 1)) for s, e in encoding["offset_mapping"]]
        return out


def test_whole_text_fallback_when_piecewise_tokenization_changes_the_text(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye."}]
    fake = DummyPrefixTokenizer(tok)
    item = tokenize_chat(fake, messages, 512)
    text = render_chat(tok, messages, add_generation_prompt=False)
    assert item.input_ids == tok(" " + text, add_special_tokens=False)["input_ids"]  # one whole-text pass
    assert loss_text(tok, item) == f"Hello there!{EOT}Goodbye.{EOT}"


# --- refusals ------------------------------------------------------------------------------------------------


def test_conversation_opening_with_an_assistant_turn_is_refused_not_mismasked(tok):
    """SmolLM2's template inserts a default system prompt; it used to land under the loss of such a turn."""
    messages = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    with pytest.raises(DataError) as excinfo:
        tokenize_example(tok, {"messages": messages, "where": "f.jsonl:7"}, 512)
    assert "f.jsonl:7" in str(excinfo.value) and "assistant turn" in str(excinfo.value)


def test_assistant_right_after_the_system_turn_is_masked_correctly(tok):
    messages = [{"role": "system", "content": "Greet first."}, {"role": "assistant", "content": "Welcome!"},
                {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Any time."}]
    item = tokenize_example(tok, {"messages": messages}, 512)
    assert loss_text(tok, item) == f"Welcome!{EOT}Any time.{EOT}"


def test_non_prefix_stable_template_is_refused(tok):
    unstable = copy.deepcopy(tok)
    # Renders only the last message: earlier turns vanish as the conversation grows.
    unstable.chat_template = ("{{ '<|im_start|>' + messages[-1]['role'] + '\\n' + messages[-1]['content'] + '<|im_end|>\\n' }}"
                              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="prefix-stably"):
        tokenize_example(unstable, {"messages": messages, "where": "x:1"}, 512)


def test_truncation_keeps_max_length_tokens_and_is_flagged(tok):
    messages = [{"role": "user", "content": "count"}, {"role": "assistant", "content": " ".join(["word"] * 200)}]
    item = tokenize_example(tok, {"messages": messages}, 64)
    assert item.truncated and len(item.input_ids) == len(item.labels) == 64
    assert item.loss_tokens > 0
    assert not tokenize_example(tok, {"messages": messages[:1] + [{"role": "assistant", "content": "x"}]}, 64).truncated
