"""The data pipeline around the masks: readers and their error locations, formats, dedup, the hash split,
train/eval overlap, and the errors a user sees for bad input."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from tuneforge.data.formats import canonicalize, detect_format
from tuneforge.data.pipeline import dedup, example_hash, hash_split, load_examples, prepare_data
from tuneforge.data.readers import read_records
from tuneforge.errors import DataError, ModelError
from tuneforge.recipe import parse_recipe


@pytest.fixture(scope="module")
def tok():
    from tuneforge.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def recipe_for(train: Path, eval_path: Path | None = None, **data):
    section = {"train": str(train), **data}
    if eval_path is not None:
        section["eval"] = str(eval_path)
    return parse_recipe({"name": "t", "data": section, "train": data.pop("train_section", {"max_length": 256})})


# --- readers -------------------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n\n" + '{"messages": [\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        read_records(str(path))
    assert str(excinfo.value).startswith(f"{path}:3: malformed JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object, got list"):
        read_records(str(path))


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(chat("a", "b")).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as excinfo:
        read_records(str(path))
    assert str(excinfo.value).startswith(f"{path}:2: not valid UTF-8")
    assert "re-save the file as UTF-8" in str(excinfo.value)


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,completion\ncaf\xe9,x\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_records(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_byte_order_mark_is_accepted(tmp_path, suffix):
    """Files saved by Windows editors start with a BOM; it used to break line 1 (or the first CSV column name)."""
    path = tmp_path / f"train{suffix}"
    body = {".jsonl": '{"prompt": "p", "completion": "c"}\n', ".json": '[{"prompt": "p", "completion": "c"}]',
            ".csv": "prompt,completion\np,c\n"}[suffix]
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    (record,) = read_records(str(path))
    assert record.data == {"prompt": "p", "completion": "c"}


def test_record_locations(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [chat("1", "x"), chat("2", "y")])
    assert [r.where for r in read_records(str(jsonl))] == [f"{jsonl}:1", f"{jsonl}:2"]
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"data": [chat("1", "x"), chat("2", "y")]}), encoding="utf-8")
    assert [r.where for r in read_records(str(js))] == [f"{js}[0]", f"{js}[1]"]
    csv = tmp_path / "c.csv"
    csv.write_text("instruction,input,output\nadd,1 1,2\nsub,2 1,1\n", encoding="utf-8")
    records = read_records(str(csv))
    assert [r.where for r in records] == [f"{csv}:2", f"{csv}:3"]
    assert records[1].data == {"instruction": "sub", "input": "2 1", "output": "1"}


def test_limit_reads_only_the_first_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(str(i), "x") for i in range(10)])
    assert len(read_records(str(path), limit=3)) == 3


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.jsonl", None, "not found"),
    ("empty.jsonl", "\n\n", "no examples found"),
    ("data.txt", "hello", "unsupported file type"),
])
def test_unreadable_sources(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_records(str(path))


# --- formats -------------------------------------------------------------------------------------------------


def records_from(tmp_path, rows):
    return read_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))


@pytest.mark.parametrize(("row", "fmt"), [
    (chat("q", "a"), "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "q", "output": "a"}, "alpaca"),
    ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ({"text": "doc"}, "text"),
])
def test_detect_format(tmp_path, row, fmt):
    assert detect_format(records_from(tmp_path, [row])[0]) == fmt


@pytest.mark.parametrize(("row", "fmt", "expected"), [
    ({"prompt": "q"}, "prompt_completion", "missing field(s) ['completion']"),
    ({"instruction": "q", "response": "a"}, "alpaca", "missing field(s) ['output']"),
    ({"foo": 1}, "auto", "cannot tell the data format"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}, "auto",
     "`messages[0].role` is 'robot': unknown role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "auto",
     "`conversations[1].from` is 'bot': unknown role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "auto",
     "`messages[1].content` is empty"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "auto",
     "`conversations[1].value` is missing"),
    ({"instruction": "q", "output": ""}, "auto", "`output` is empty"),
    ({"prompt": "q", "completion": ""}, "auto", "`completion` is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "auto", "no assistant turn"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}, "auto",
     "the completion has no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "auto",
     "`messages[0].content` must be a string, got int"),
    ({"messages": []}, "auto", "`messages` must be a non-empty list"),
    ({"text": ""}, "text", "`text` is empty"),
])
def test_bad_examples_name_the_field_and_the_line(tmp_path, row, fmt, expected):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n", encoding="utf-8")  # blank lines are skipped but still counted
    records = read_records(str(path))
    with pytest.raises(DataError) as excinfo:
        canonicalize(records, fmt)
    message = str(excinfo.value)
    assert expected in message
    assert f"{tmp_path / 'd.jsonl'}:2" in message


def test_mixed_formats_in_one_file_are_refused(tmp_path):
    records = records_from(tmp_path, [chat("q", "a"), {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match="looks like prompt_completion but the file started as messages"):
        canonicalize(records, "auto")


def test_system_prompt_is_added_only_where_there_is_none(tmp_path):
    with_system = {"messages": [{"role": "system", "content": "own"}, *chat("q", "a")["messages"]]}
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), with_system])
    examples, _ = load_examples(str(path), "auto", system_prompt="default")
    assert examples[0]["messages"][0] == {"role": "system", "content": "default"}
    assert examples[1]["messages"][0] == {"role": "system", "content": "own"}
    assert len(examples[1]["messages"]) == 3


# --- dedup and split -----------------------------------------------------------------------------------------


def test_dedup_removes_exact_and_normalised_duplicates_and_counts_them():
    examples = [
        chat("What is 2+2?", "4"),
        chat("What is 2+2?", "4"),                 # exact
        chat("what  is 2+2?", "4"),                # case and inner whitespace
        chat("What is 2+2?\n", " 4 "),             # trailing newline / surrounding spaces
        chat("What\tis\n2+2?", "4"),               # tab / newline instead of a space
        chat("What is 2+3?", "5"),                 # different
        {"messages": [{"role": "system", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},  # role differs
        {"text": "A document."}, {"text": "a  DOCUMENT. "},
    ]
    kept, removed = dedup(examples)
    assert removed == 5
    assert kept == [examples[0], examples[5], examples[6], examples[7]]


def test_example_hash_ignores_location_but_not_content():
    a = {**chat("q", "a"), "where": "x.jsonl:1"}
    b = {**chat("q", "a"), "where": "y.jsonl:9"}
    assert example_hash(a) == example_hash(b)
    assert example_hash(a) != example_hash(chat("q", "b"))
    assert example_hash({"text": "q a"}) != example_hash(chat("q", "a"))


THOUSAND = [chat(f"question number {i}", f"answer {i * 7}") for i in range(1000)]


def keys(examples):
    return [example_hash(e) for e in examples]


def test_hash_split_is_deterministic_whatever_the_order():
    train, held = hash_split(THOUSAND, 0.1)
    shuffled = THOUSAND[:]
    random.Random(0).shuffle(shuffled)
    train2, held2 = hash_split(shuffled, 0.1)
    assert sorted(keys(train)) == sorted(keys(train2))
    assert sorted(keys(held)) == sorted(keys(held2))
    assert hash_split(THOUSAND, 0.1) == (train, held)


def test_hash_split_is_disjoint_complete_and_near_the_fraction():
    for fraction in (0.05, 0.1, 0.25):
        train, held = hash_split(THOUSAND, fraction)
        assert not set(keys(train)) & set(keys(held))
        assert len(train) + len(held) == len(THOUSAND)
        assert abs(len(held) - fraction * 1000) <= 0.3 * fraction * 1000 + 10, (fraction, len(held))


def test_hash_split_larger_fraction_only_moves_examples_into_eval():
    small = set(keys(hash_split(THOUSAND, 0.05)[1]))
    large = set(keys(hash_split(THOUSAND, 0.2)[1]))
    assert small < large


def test_tiny_hash_split_holds_out_one_example_independently_of_order():
    """With too few examples for the fraction, the one held out used to be whichever came last in the file."""
    examples = [{"text": f"doc {i}"} for i in range(3)]
    train, held = hash_split(examples, 0.1)
    assert len(held) == 1 and len(train) == 2
    for order in ([2, 1, 0], [1, 2, 0], [0, 2, 1]):
        train2, held2 = hash_split([examples[i] for i in order], 0.1)
        assert keys(held2) == keys(held)
        assert sorted(keys(train2)) == sorted(keys(train))


# --- prepare_data --------------------------------------------------------------------------------------------


def test_prepare_data_dedups_splits_and_counts(tmp_path, tok):
    rows = [chat(f"q{i}", f"a{i}") for i in range(60)] + [chat("q0", "a0"), chat("Q1 ", "a1")]
    recipe = recipe_for(write_jsonl(tmp_path / "train.jsonl", rows), eval_fraction=0.2)
    data = prepare_data(recipe, tok)
    stats = data.stats
    assert stats.duplicates_removed == 2
    assert stats.eval_split_from_train
    assert stats.train_examples + stats.eval_examples == 60
    assert stats.eval_examples == len(data.eval) == len(data.eval_examples) > 0
    assert stats.overlap_train_eval == 0
    assert not set(keys(data.train_examples)) & set(keys(data.eval_examples))
    assert stats.train_tokens == sum(len(t.input_ids) for t in data.train)


def test_prepare_data_reports_train_eval_overlap(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    held = write_jsonl(tmp_path / "eval.jsonl", [chat("q3", "a3"), chat("Q7", "a7 "), chat("new", "one")])
    data = prepare_data(recipe_for(train, held), tok)
    assert data.stats.overlap_train_eval == 2
    assert not data.stats.eval_split_from_train
    assert data.stats.train_examples == 20 and data.stats.eval_examples == 3


def test_chat_data_with_a_tokenizer_without_template_is_a_model_error(tmp_path, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(5)])
    with pytest.raises(ModelError) as excinfo:
        prepare_data(recipe_for(train), plain)
    assert excinfo.value.where == "model.chat_template"
    assert str(excinfo.value).startswith("model.chat_template:") and "chat template" in str(excinfo.value)


def test_everything_truncated_to_zero_loss_is_a_data_error(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(10)])
    recipe = parse_recipe({"name": "t", "data": {"train": str(train)}, "train": {"max_length": 9}})
    with pytest.raises(DataError) as excinfo:
        prepare_data(recipe, tok)
    assert excinfo.value.where == "data.train"
    assert "max_length" in str(excinfo.value)


def test_examples_truncated_to_zero_loss_are_dropped_and_counted(tmp_path, tok):
    short = [chat(f"q{i}", f"a{i}") for i in range(6)]
    long = [chat("x " * 300 + str(i), "late answer") for i in range(3)]
    held = write_jsonl(tmp_path / "eval.jsonl", [chat("e", "e")])
    data = prepare_data(recipe_for(write_jsonl(tmp_path / "train.jsonl", short + long), held), tok)
    assert data.stats.dropped_no_loss == 3
    assert data.stats.truncated == 3
    assert data.stats.train_examples == 6
    assert all(item.loss_tokens > 0 for item in data.train)


def test_sft_on_plain_text_is_refused(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    with pytest.raises(DataError) as excinfo:
        prepare_data(recipe_for(train), tok)
    assert excinfo.value.where == "data.format" and "method: cpt" in str(excinfo.value)


def test_cpt_reads_text_even_when_format_is_auto(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"document number {i}"} for i in range(30)])
    recipe = parse_recipe({"name": "t", "method": "cpt", "data": {"train": str(train)}})
    data = prepare_data(recipe, tok)
    assert data.stats.format == "text"
    assert all(item.labels == item.input_ids for item in data.train)


def test_bad_line_surfaces_through_prepare_data_with_its_location(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                                  {"role": "assistant", "content": ""}]})
                    + "\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        prepare_data(recipe_for(path), tok)
    assert f"{path}:2" in str(excinfo.value) and "`messages[1].content` is empty" in str(excinfo.value)
