"""Reward functions (src/tuneforge/rewards.py): every built-in on known good and bad outputs, the sandbox's timeout
and network block through code_tests, the recipe checks of names/options, and the custom-reward loader's errors."""

from __future__ import annotations

import json

import pytest

from tuneforge.errors import RecipeError
from tuneforge.recipe import parse_recipe
from tuneforge.rewards import RewardError, build_rewards, completion_text, extract_answer, probe_rewards, score_all


class Spec:
    def __init__(self, name, weight=1.0, options=None):
        self.name, self.weight, self.options = name, weight, options or {}


def one(name, options=None, **kwargs):
    (reward,) = build_rewards([Spec(name, 1.0, options)], **kwargs)
    return reward


def call(reward, completions, **columns):
    return reward.function(["q"] * len(completions), completions, **columns)


def test_exact_answer_good_and_bad():
    reward = one("exact_answer")
    got = call(reward, ["12 + 30 = 42\nAnswer: 42", "Answer: 41", "The answer is 42", "Answer: 1,000", "Answer: -3"],
               answer=[42, 42, 42, 1000, "-3"])
    assert got == [1.0, 0.0, 0.0, 1.0, 1.0]  # the third has no "Answer:" line and no fallback
    fallback = one("exact_answer", {"fallback_last_number": True})
    assert call(fallback, ["so 7 + 5 = 12.", "so it is 13"], answer=[12, 12]) == [1.0, 0.0]
    # chat-turn completions (what TRL passes for conversational prompts) read as text
    assert call(reward, [[{"role": "assistant", "content": "Answer: 7"}]], answer=["7"]) == [1.0]
    assert extract_answer("Answer: 3 then Answer: 4") == 4.0


def test_exact_answer_names_a_missing_column():
    reward = one("exact_answer", {"field": "solution"})
    with pytest.raises(RewardError, match="rl.rewards.0.*column `solution`"):
        call(reward, ["Answer: 1"], answer=[1])


def test_regex_format_reward():
    reward = one("regex", {"pattern": r"^Answer: \d+$"})
    assert call(reward, ["Answer: 12", "work...\nAnswer: 12", "answer: 12", "Answer: twelve"]) == [1.0, 1.0, 0.0, 0.0]
    full = one("regex", {"pattern": r"Answer: \d+", "fullmatch": True})
    assert call(full, ["Answer: 12", "so Answer: 12"]) == [1.0, 0.0]


def test_json_schema_reward(tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    reward = one("json_schema", {"schema": str(path)})
    assert call(reward, ['{"name": "Ada"}', '```json\n{"name": "Ada"}\n```', '{"age": 3}', "not json"]) == [1.0, 1.0, 0.0, 0.0]
    any_json = one("json_schema")
    assert call(any_json, ["[1, 2]", "{oops"]) == [1.0, 0.0]
    per_example = one("json_schema", {"field": "schema"})
    assert call(per_example, ['{"name": "x"}', '{"name": 1}'], schema=[json.dumps(schema), json.dumps(schema)]) == [1.0, 0.0]


def test_length_reward():
    reward = one("length", {"min": 5, "max": 10})
    assert call(reward, ["1234567", "12345678901234567890", "x" * 15, "12"]) == [1.0, 0.0, 0.5, pytest.approx(0.4)]
    words = one("length", {"max": 3, "unit": "words"})
    assert call(words, ["one two", "one two three four five six"]) == [1.0, 0.0]


def test_code_tests_reward_passes_fails_times_out_and_blocks_network():
    reward = one("code_tests", {"timeout": 2})
    tests = "assert add(2, 3) == 5"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a - b"
    sleeper = "import time\ndef add(a, b):\n    time.sleep(30)\n    return a + b"
    network = ("import socket\ndef add(a, b):\n    socket.create_connection(('93.184.216.34', 80), timeout=2)\n"
               "    return a + b")
    scores = call(reward, [good, wrong, sleeper, network], tests=[tests] * 4)
    assert scores == [1.0, 0.0, 0.0, 0.0]
    results = reward.extra["raw"].last_results
    assert not results[0].timed_out and results[2].timed_out
    assert not results[3].timed_out and results[3].returncode != 0  # refused, not hung
    assert results[3].isolation == "netns" or "network access is blocked" in results[3].stderr


def test_weighted_total_and_per_reward_scores():
    rewards = build_rewards([Spec("exact_answer", 1.0), Spec("regex", 0.5, {"pattern": "^Answer:"})])
    scores = score_all(rewards, ["q", "q"], ["Answer: 4", "4"], {"answer": [4, 4]})
    assert scores["per_reward"] == {"exact_answer": [1.0, 0.0], "regex": [1.0, 0.0]}
    assert scores["total"] == [1.5, 0.0]


@pytest.mark.parametrize("item, message", [
    ({"name": "exact_anser"}, "unknown reward 'exact_anser'"),
    ({"name": "regex"}, "needs option"),
    ({"name": "regex", "options": {"pattern": "("}}, "not a valid regular expression"),
    ({"name": "length", "options": {"max": 10, "maximum": 3}}, "no option 'maximum'"),
    ({"name": "length", "options": {"min": 9, "max": 3}}, "min <= max"),
])
def test_bad_reward_specs_fail_when_the_recipe_loads(tmp_path, item, message):
    data = {"name": "x", "method": "grpo", "data": {"train": "t.jsonl"}, "train": {"batch_size": 8},
            "rl": {"rewards": [item]}}
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert "rl.rewards.0" in str(info.value) and message in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Custom reward files


def write(tmp_path, text):
    path = tmp_path / "my_rewards.py"
    path.write_text(text)
    return path


def test_custom_reward_loads_and_receives_columns(tmp_path):
    path = write(tmp_path, "def short(prompts, completions, answer, **kwargs):\n"
                           "    return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]\n")
    reward = one("custom", {"path": str(path), "function": "short"})
    assert reward.name == "short"
    assert call(reward, ["it is 4", "it is 5"], answer=[4, 4]) == [1.0, 0.0]


@pytest.mark.parametrize("text, function, message", [
    (None, "f", "file not found"),
    ("def g(prompts, completions, **kw):\n    return []\n", "f", "defines no `f`; functions in it: g"),
    ("import not_a_module_xyz\n", "f", "importing the file failed: ModuleNotFoundError"),
    ("def f(text):\n    return [0.0]\n", "f", "wrong signature"),
    ("f = 3\n", "f", "is not a function"),
])
def test_custom_reward_loader_errors(tmp_path, text, function, message):
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.py"
    with pytest.raises(RecipeError) as info:
        build_rewards([Spec("exact_answer"), Spec("custom", 1.0, {"path": str(path), "function": function})])
    rendered = str(info.value)
    assert "rl.rewards.1" in rendered and str(path) in rendered and message in rendered


@pytest.mark.parametrize("body, message", [
    ("    raise ValueError('bad input')", "raised ValueError: bad input"),
    ("    return [1.0]", "returned 1 values for 2 completions"),
    ("    return ['high', 'low']", "returned 'high'"),
    ("    return 0.5", "returned float"),
])
def test_custom_reward_failures_name_the_key_and_file(tmp_path, body, message):
    path = write(tmp_path, f"def f(prompts, completions, **kwargs):\n{body}\n")
    reward = one("custom", {"path": str(path), "function": "f"})
    with pytest.raises(RewardError) as info:
        call(reward, ["a", "b"])
    assert message in str(info.value) and "rl.rewards.0" in str(info.value) and "my_rewards.py:f" in str(info.value)


def test_probe_names_a_required_parameter_the_data_lacks(tmp_path):
    path = write(tmp_path, "def f(prompts, completions, judge_model):\n    return [0.0]\n")
    rewards = build_rewards([Spec("exact_answer"), Spec("custom", 1.0, {"path": str(path), "function": "f"})])
    with pytest.raises(RecipeError) as info:
        probe_rewards(rewards, {"prompt": [{"role": "user", "content": "1+1?"}], "answer": 2})
    assert "rl.rewards.1" in str(info.value) and "requires judge_model" in str(info.value) and "columns: answer" in str(info.value)


def test_probe_calls_every_reward_before_training(tmp_path):
    path = write(tmp_path, "def f(prompts, completions, **kwargs):\n    raise KeyError('answer')\n")
    rewards = build_rewards([Spec("exact_answer"), Spec("custom", 1.0, {"path": str(path), "function": "f"})])
    with pytest.raises(RewardError, match="raised KeyError"):
        probe_rewards(rewards, {"prompt": [{"role": "user", "content": "1+1?"}], "answer": 2})


def test_completion_text_reads_strings_and_turns():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
