"""Bad input, fuzzed (hypothesis): every malformed data file or recipe ends in one of our errors naming where the
problem is (file:line, or the recipe key), or in a counted drop/truncation; never in another exception.

Data: malformed JSONL, wrong types, unknown roles, empty turns, non-UTF-8 bytes, enormous lines, examples longer
than max_length, preference pairs whose chosen == rejected (up to case and spacing). The data pipeline runs to
token ids (prepare_data with the embedded tokenizer; no model is loaded).
Recipes: a wrong-typed value at every key of the Recipe model (walked from its pydantic fields), and random values
at random keys (including inside a stage)."""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tuneforge.data.pipeline import prepare_data
from tuneforge.errors import DataError, RecipeError
from tuneforge.recipe import Recipe, load_recipe, parse_recipe

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tok():
    from tuneforge.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


def good_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{2 * i}"}]}


def run_pipeline(tok, lines: list[bytes], *, max_length: int = 256, method: str = "sft", **data):
    """Write the lines as a .jsonl file and prepare it as `train` would. Returns (stats, None) or (None, DataError)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        recipe = parse_recipe({"name": "fuzz", "method": method, "data": {"train": str(path), **data},
                               "train": {"max_length": max_length}})
        try:
            return prepare_data(recipe, tok), None, str(path)
        except DataError as exc:
            return None, exc, str(path)


def assert_located(error: DataError, path: str, line: int | None = None):
    """Our error, naming the file (and the line when known) and saying what is wrong."""
    assert error is not None
    assert error.message and "Traceback" not in error.render()
    if line is not None:
        assert error.where == f"{path}:{line}", (error.where, line, error.message)
    else:
        assert error.where and (error.where.startswith(path) or error.where.startswith("data.")), error.where


# ---------------------------------------------------------------------------------------------------------------
# Data


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@FUZZ
@given(bad=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=80),
       at=st.integers(min_value=0, max_value=5))
def test_malformed_jsonl_lines(tok, bad, at):
    """Any text as one line among good ones: a JSON object is read as a record (and checked as one), anything
    else is an error naming that line."""
    lines = [json.dumps(good_row(i)).encode() for i in range(6)]
    lines.insert(at, bad.encode("utf-8"))
    stats, error, path = run_pipeline(tok, lines)
    if error is None:
        assert stats.stats.train_examples + stats.stats.eval_examples >= 1
        return
    try:
        parsed = json.loads(bad) if bad.strip() else None
    except (ValueError, RecursionError):
        parsed = "not json"
    if bad.strip():  # a blank line is skipped; anything else that fails names its line
        assert_located(error, path, at + 1 if not isinstance(parsed, dict) else None)


@FUZZ
@given(value=json_values, field=st.sampled_from(["messages", "role", "content", "message"]))
def test_wrong_types_in_chat_records(tok, value, field):
    row = good_row(1)
    if field == "messages":
        row["messages"] = value
    elif field == "message":
        row["messages"][0] = value
    else:
        row["messages"][1][field] = value
    lines = [json.dumps(good_row(i)).encode() for i in range(5)] + [json.dumps(row).encode()]
    stats, error, path = run_pipeline(tok, lines)
    if error is not None:
        assert_located(error, path, 6)
    else:  # the value happened to be valid (e.g. an assistant answer that is a non-empty string)
        assert stats.stats.train_examples + stats.stats.eval_examples >= 5


@FUZZ
@given(role=st.one_of(st.text(max_size=12), json_values).filter(lambda r: r not in ("system", "user", "assistant", "tool")),
       sharegpt=st.booleans())
def test_unknown_roles(tok, role, sharegpt):
    if sharegpt:
        row = {"conversations": [{"from": role, "value": "hi"}, {"from": "gpt", "value": "hello"}]}
        if isinstance(role, str) and role in ("human", "user", "gpt", "assistant", "model", "system", "tool",
                                               "function_response"):
            return
        good = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(4)]
    else:
        row = {"messages": [{"role": role, "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        good = [good_row(i) for i in range(4)]
    lines = [json.dumps(r).encode() for r in good + [row]]
    _, error, path = run_pipeline(tok, lines)
    assert_located(error, path, 5)
    assert "unknown role" in error.message


@FUZZ
@given(blank=st.sampled_from(["", " ", "\n\t ", "\u3000"]), turn=st.sampled_from([0, 1]),
       fmt=st.sampled_from(["messages", "alpaca", "prompt_completion"]))
def test_empty_turns(tok, blank, turn, fmt):
    if fmt == "messages":
        row = good_row(9)
        row["messages"][turn]["content"] = blank
        good = [good_row(i) for i in range(4)]
    elif fmt == "alpaca":
        row = {"instruction": blank if turn == 0 else "q", "output": blank if turn == 1 else "a"}
        good = [{"instruction": f"q{i}", "output": "a"} for i in range(4)]
    else:
        row = {"prompt": blank if turn == 0 else "q", "completion": blank if turn == 1 else "a"}
        good = [{"prompt": f"q{i}", "completion": "a"} for i in range(4)]
    _, error, path = run_pipeline(tok, [json.dumps(r).encode() for r in good + [row]])
    assert_located(error, path, 5)
    assert "empty" in error.message


@FUZZ
@given(junk=st.binary(min_size=1, max_size=16), at=st.integers(min_value=0, max_value=40))
def test_non_utf8_bytes(tok, junk, at):
    line = json.dumps(good_row(7)).encode()
    broken = line[:at] + junk + line[at:]
    lines = [json.dumps(good_row(i)).encode() for i in range(4)] + [broken]
    stats, error, path = run_pipeline(tok, lines)
    try:
        broken.decode("utf-8")
        valid_utf8 = True
    except UnicodeDecodeError:
        valid_utf8 = False
    line = 5 if b"\n" not in junk else None  # a newline in the junk splits the line in two
    if not valid_utf8:
        assert_located(error, path, line)
        if line is not None:  # split in two, the first half may fail first as JSON
            assert "UTF-8" in error.message
    elif error is not None:  # valid UTF-8 that broke the JSON or a field: still that line
        assert_located(error, path, line)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(size=st.integers(min_value=50_000, max_value=400_000), where=st.sampled_from(["answer", "question", "nesting"]))
def test_enormous_lines(tok, size, where):
    """A line of hundreds of kB: read, then truncated at max_length and counted (or dropped and counted when no
    answer token is left); absurd nesting is an error naming the line."""
    if where == "nesting":
        line = b'{"messages": ' + b"[" * size + b"]" * size + b"}"
    else:
        row = good_row(3)
        row["messages"][1 if where == "answer" else 0]["content"] = "word " * (size // 5)
        line = json.dumps(row).encode()
    lines = [json.dumps(good_row(i)).encode() for i in range(5)] + [line]
    stats, error, path = run_pipeline(tok, lines, max_length=64)
    if where == "nesting":
        assert_located(error, path, 6)
        return
    assert error is None, error
    s = stats.stats
    held_out = any(len(m["content"]) > 10_000 for e in stats.eval_examples for m in e["messages"])
    assert s.truncated + s.dropped_no_loss >= 1 or held_out  # the enormous one was cut or dropped, and counted
    assert all(len(t.input_ids) <= 64 for t in stats.train + stats.eval)


@FUZZ
@given(lengths=st.lists(st.integers(min_value=1, max_value=120), min_size=3, max_size=10),
       max_length=st.integers(min_value=16, max_value=96))
def test_examples_longer_than_max_length(tok, lengths, max_length):
    """Examples of random length against a random max_length: every row fits, and what was cut or dropped is
    counted; when nothing is left to learn from, a DataError names data.train."""
    rows = [{"messages": [{"role": "user", "content": f"question {i}: " + "why " * n},
                          {"role": "assistant", "content": "because " * n}]} for i, n in enumerate(lengths)]
    stats, error, path = run_pipeline(tok, [json.dumps(r).encode() for r in rows], max_length=max_length, dedup=False)
    if error is not None:
        assert error.where == "data.train" and "max_length" in error.fix
        return
    s = stats.stats
    assert all(len(t.input_ids) <= max_length for t in stats.train + stats.eval)
    assert s.train_examples + s.dropped_no_loss == len(stats.train_examples)
    assert s.truncated >= s.dropped_no_loss


@FUZZ
@given(answer=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
       .filter(lambda a: a.strip()),
       variant=st.sampled_from(["same", "upper", "spaces"]), as_messages=st.booleans())
def test_preference_pairs_with_chosen_equal_to_rejected(tok, answer, variant, as_messages):
    rejected = {"same": answer, "upper": answer.upper(), "spaces": "  " + " ".join(answer.split()) + "\n"}[variant]
    if " ".join(rejected.lower().split()) != " ".join(answer.lower().split()):
        return  # e.g. a character whose upper case folds differently: not the same answer
    if as_messages:
        pair = {"prompt": [{"role": "user", "content": "q?"}], "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        pair = {"prompt": "q?", "chosen": answer, "rejected": rejected}
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    _, error, path = run_pipeline(tok, [json.dumps(r).encode() for r in good + [pair]], method="dpo")
    assert_located(error, path, 5)
    assert "same answer" in error.message


@FUZZ
@given(value=json_values, key=st.sampled_from(["prompt", "chosen", "rejected", "label", "completion"]))
def test_wrong_types_in_preference_records(tok, value, key):
    kto = key in ("label", "completion")
    row = {"prompt": "q?", "completion": "a", "label": True} if kto else {"prompt": "q?", "chosen": "a", "rejected": "b"}
    row[key] = value
    good = ([{"prompt": f"q{i}", "completion": "a", "label": i % 2 == 0} for i in range(4)] if kto
            else [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)])
    stats, error, path = run_pipeline(tok, [json.dumps(r).encode() for r in good + [row]],
                                      method="kto" if kto else "dpo")
    if error is not None:
        assert_located(error, path, 5)


# ---------------------------------------------------------------------------------------------------------------
# Recipes


def _leaf_keys(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, typing.Any, bool]]:
    """(key path, annotation, is_section) for every field of the Recipe, sections and their keys."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        section = _section_model(annotation)
        out.append((prefix + (name,), annotation, section is not None))
        if section is not None:
            out.extend(_leaf_keys(section, prefix + (name,)))
    return out


def _section_model(annotation):
    """The section model of `Section` or `Section | None` (a list of sections is a leaf here)."""
    if typing.get_origin(annotation) is list:
        return None
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _wrong_values(annotation, is_section: bool) -> list:
    """Values of a type the key does not take."""
    if is_section:
        return [[1, 2], 3.5]
    args = set(typing.get_args(annotation)) | {annotation}
    origin_types = {typing.get_origin(a) or a for a in args}
    wrong = [{"wrong": "type"}]
    if origin_types & {int, float}:
        wrong.append("not-a-number")
    if typing.get_origin(annotation) is typing.Literal or any(typing.get_origin(a) is typing.Literal for a in args):
        wrong.append("no-such-choice")
    if str in origin_types and not origin_types & {int, float}:
        wrong.append(12345)
    if bool in origin_types:
        wrong.append("maybe")
    if list in origin_types and str not in origin_types:
        wrong.append(7)
    return wrong


BASE = {"name": "fuzz", "model": "embedded:smollm2-135m-instruct", "data": {"train": "train.jsonl"}}
RECIPE_KEYS = _leaf_keys(Recipe)


def _with(data: dict, path: tuple, value) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {"name": node[key]} if key == "model" and isinstance(node.get(key), str) else {}
        node = node[key]
    node[path[-1]] = value
    return data


def test_wrong_type_at_every_recipe_key(tmp_path):
    """Walk the Recipe's pydantic fields; put each wrong-typed value at each key, in a YAML file: one RecipeError
    that names the key and its line; never another exception."""
    cases = 0
    for path, annotation, is_section in RECIPE_KEYS:
        for value in _wrong_values(annotation, is_section):
            recipe = tmp_path / "r.yaml"
            recipe.write_text(yaml.safe_dump(_with(BASE, path, value), sort_keys=False))
            with pytest.raises(RecipeError) as caught:
                load_recipe(recipe)
            key = ".".join(path)
            text = caught.value.render()
            assert f"`{key}`" in text or f"`{key}." in text, (key, value, text)
            assert f"{recipe}:" in text, text  # the YAML line
            cases += 1
    assert len(RECIPE_KEYS) >= 60 and cases >= 2 * len(RECIPE_KEYS)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(RECIPE_KEYS), value=json_values, in_stage=st.booleans())
def test_random_values_at_random_recipe_keys(key, value, in_stage):
    """Any JSON value at any key (of the recipe, or of its second stage): a valid recipe, or a RecipeError naming
    a key; never another exception."""
    path = key[0]
    if in_stage:
        if path[0] in ("stages", "output_dir"):
            return
        stage = _with({"name": "two"}, path, value)
        data = {**BASE, "stages": [{"name": "one"}, stage]}
    else:
        data = _with(BASE, path, value)
    try:
        parse_recipe(data)
    except RecipeError as exc:
        assert exc.problems and all("`" in p or "recipe" in p for p in exc.problems), exc.problems
        if in_stage:
            assert any("stages.1" in p or "stages" in p for p in exc.problems), exc.problems
