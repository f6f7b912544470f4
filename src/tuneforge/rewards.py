"""Reward functions for RL (grpo, rloo, online_dpo): `rl.rewards` in the recipe, a list of {name, weight, options}.

Every reward is called the way TRL calls reward functions: `reward(prompts, completions, **columns)` -> one float per
completion, where `columns` are the data's other fields (`answer`, `tests`, `schema`, ...), one value per completion.
Completions may be strings or chat turns ([{"role": "assistant", "content": ...}]); both are read as text.
The total reward is the weighted sum (TRL's `reward_weights`); each reward is also logged on its own.

Built-ins (options in brackets, defaults after =):
  exact_answer  1 if the number after "Answer:" (or the last number, fallback_last_number) equals the data's answer
                [field=answer, pattern=Answer:\\s*(number), fallback_last_number=false, tolerance=1e-6]
  regex         1 if the completion matches a pattern (format rewards) [pattern (required), fullmatch=false,
                ignore_case=false]
  json_schema   1 if the completion is JSON valid against a schema (no schema: any valid JSON)
                [schema=(file or inline), field=(a data column holding a schema per example), allow_fence=true]
  length        1 inside [min, max] characters (or words), falling linearly to 0 at twice the distance
                [min=0, max (required), unit=chars|words]
  code_tests    1 if the completion's code (fences stripped) followed by the data's tests exits 0, run in the
                sandbox (evaluate/sandbox.py: own process, timeout, no network) [field=tests, timeout=5, memory_mb=1024]
  reward_model  the score of a trained reward model (a `method: reward` run) on prompt + completion [path (required)]
  custom        a function from a Python file [path, function (both required)]: `function(prompts, completions,
                **kwargs) -> list[float]` (take **kwargs to receive the data's columns)

Errors: an unknown name or option fails when the recipe loads (`rl.rewards.N`); a custom file or function that is
missing, has the wrong signature, returns the wrong thing or raises is a RecipeError naming the key and the file,
checked once on a sample before training and again on every call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tuneforge.errors import RecipeError, TuneforgeError

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
DEFAULT_ANSWER_PATTERN = r"Answer:\s*\**\s*(" + NUMBER + r")"

from tuneforge.reward_specs import BUILTINS, check_reward_spec  # noqa: F401  (the names users read here)


class RewardError(TuneforgeError):
    """A reward function failed while scoring (a custom function raised, returned the wrong thing, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# Text helpers


def completion_text(completion) -> str:
    """A completion as TRL passes it (a string, or a list of chat turns) -> its text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(turn) for turn in completion)
    return "" if completion is None else str(completion)


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return None
    return value if math.isfinite(value) else None


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN, fallback_last_number: bool = False) -> float | None:
    """The number captured by `pattern` (its last match), else (fallback) the last number in the text."""
    matches = re.findall(pattern, text)
    if matches:
        last = matches[-1]
        return _number(last if isinstance(last, str) else last[0])
    if fallback_last_number:
        numbers = re.findall(NUMBER, text)
        return _number(numbers[-1]) if numbers else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Built-in rewards: each returns a function(prompts, completions, **columns) -> list[float]


def _column(columns: dict, name: str, n: int, reward: str, key: str) -> list:
    if name not in columns:
        available = ", ".join(k for k in columns if k not in _TRL_EXTRAS) or "(none)"
        raise RewardError(f"reward {reward} reads the data column `{name}`, which the data does not have "
                          f"(columns: {available})", where=key,
                          fix=f"add `{name}` to every example, or point options.field at the column that holds it")
    values = list(columns[name])
    if len(values) != n:
        raise RewardError(f"column `{name}` has {len(values)} values for {n} completions", where=key)
    return values


_TRL_EXTRAS = {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"}


def exact_answer(*, field: str = "answer", pattern: str = DEFAULT_ANSWER_PATTERN, fallback_last_number: bool = False,
                 tolerance: float = 1e-6, key: str = "rl.rewards") -> Callable:
    def reward(prompts, completions, **columns):
        answers = _column(columns, field, len(completions), "exact_answer", key)
        out = []
        for completion, answer in zip(completions, answers):
            got = extract_answer(completion_text(completion), pattern, fallback_last_number)
            want = answer if isinstance(answer, (int, float)) and not isinstance(answer, bool) else _number(str(answer))
            out.append(1.0 if got is not None and want is not None and abs(got - want) <= tolerance else 0.0)
        return out

    return reward


def regex(*, pattern: str, fullmatch: bool = False, ignore_case: bool = False, key: str = "rl.rewards") -> Callable:
    compiled = re.compile(pattern, (re.IGNORECASE if ignore_case else 0) | re.MULTILINE)
    match = compiled.fullmatch if fullmatch else compiled.search

    def reward(prompts, completions, **columns):
        return [1.0 if match(completion_text(c).strip()) else 0.0 for c in completions]

    return reward


def json_schema(*, schema=None, field: str | None = None, allow_fence: bool = True, key: str = "rl.rewards",
                base_dir: Path | None = None) -> Callable:
    from tuneforge.evaluate.metrics import _parse_json, _schema_validator

    if isinstance(schema, str) and base_dir is not None and not schema.lstrip().startswith("{"):
        candidate = Path(schema)
        if not candidate.is_absolute() and not candidate.exists() and (base_dir / candidate).exists():
            schema = str(base_dir / candidate)
    try:
        fixed = _schema_validator(schema, f"`{key}.options.schema`") if schema is not None else None
    except RecipeError:
        raise
    cache: dict[str, object] = {}

    def validator_for(value):
        import json

        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if text not in cache:
            cache[text] = _schema_validator(value if not isinstance(value, str) else text, f"`{key}` (data column {field})")
        return cache[text]

    def reward(prompts, completions, **columns):
        per_example = _column(columns, field, len(completions), "json_schema", key) if field else None
        out = []
        for i, completion in enumerate(completions):
            try:
                document = _parse_json(completion_text(completion), allow_fence)
            except ValueError:
                out.append(0.0)
                continue
            validator = validator_for(per_example[i]) if per_example is not None else fixed
            out.append(1.0 if validator is None or validator.is_valid(document) else 0.0)
        return out

    return reward


def length(*, max: float, min: float = 0, unit: str = "chars", key: str = "rl.rewards") -> Callable:  # noqa: A002
    lo, hi = float(min), float(max)

    def score(n: float) -> float:
        if lo <= n <= hi:
            return 1.0
        if n > hi:
            return _clip(1.0 - (n - hi) / hi)
        return _clip(1.0 - (lo - n) / lo) if lo > 0 else 1.0

    def reward(prompts, completions, **columns):
        texts = [completion_text(c).strip() for c in completions]
        return [score(len(t.split()) if unit == "words" else len(t)) for t in texts]

    return reward


def _clip(value: float) -> float:
    return 0.0 if value < 0 else 1.0 if value > 1 else value


def code_tests(*, field: str = "tests", timeout: float = 5, memory_mb: int = 1024, key: str = "rl.rewards") -> Callable:
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tuneforge.evaluate.metrics import strip_code_fence
    from tuneforge.evaluate.sandbox import run_python

    def reward(prompts, completions, **columns):
        tests = _column(columns, field, len(completions), "code_tests", key)
        programs = [strip_code_fence(completion_text(c)) + "\n\n" + str(t) + "\n" for c, t in zip(completions, tests)]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            results = list(pool.map(lambda code: run_python(code, timeout=timeout, memory_mb=memory_mb), programs))
        reward.last_results = results  # for tests and debugging: which ones timed out, stderr
        return [1.0 if r.passed else 0.0 for r in results]

    reward.last_results = []
    return reward


def reward_model(*, path: str, batch_size: int = 8, key: str = "rl.rewards", device: str | None = None,
                 base_dir: Path | None = None, trust_remote_code: bool = False) -> Callable:
    from tuneforge.methods.reward import load_reward_model, score_texts

    resolved = Path(path)
    if not resolved.exists() and base_dir is not None and (base_dir / path).exists():
        resolved = base_dir / path
    model, tokenizer = load_reward_model(str(resolved), device=device, where=f"{key}.options.path",
                                         trust_remote_code=trust_remote_code)

    def reward(prompts, completions, **columns):
        texts = [_conversation_text(tokenizer, p, c) for p, c in zip(prompts, completions)]
        return score_texts(model, tokenizer, texts, batch_size=batch_size)

    reward.model, reward.tokenizer = model, tokenizer
    return reward


def _conversation_text(tokenizer, prompt, completion) -> str:
    """prompt + completion as the reward model was trained on them: the chat template for chat turns."""
    if isinstance(prompt, list) and tokenizer.chat_template:
        answer = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion_text(completion)}]
        return tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    return completion_text(prompt) + completion_text(completion)


# ---------------------------------------------------------------------------------------------------------------
# Custom rewards from a Python file


def load_custom_reward(path: str | Path, function_name: str, *, key: str = "rl.rewards") -> Callable:
    """Import `function_name` from the Python file at `path`; it must take (prompts, completions, **kwargs)."""
    import inspect

    from tuneforge.user_code import import_user_function

    where = f"`{key}` (custom reward {Path(path).expanduser()}:{function_name})"
    function = import_user_function(path, function_name, where=where, kind="reward")
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return function
    names = {p.name for p in parameters}
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    fixed = {"prompts", "completions"} | ({"completion_ids"} if "completion_ids" in names else set())
    problems = []
    if "completions" not in names:
        problems.append("it has no `completions` parameter")
    if "prompts" not in names and not var_keyword:
        problems.append("it has no `prompts` parameter and no **kwargs")
    if problems:
        actual = f"{function_name}{inspect.signature(function)}"
        raise RecipeError([f"{where}: wrong signature {actual}: {'; '.join(problems)}. A reward function is "
                           f"`def {function_name}(prompts, completions, **kwargs) -> list[float]` (one number per "
                           f"completion; data columns such as `answer` arrive in kwargs)"])
    # other required parameters must be data columns: checked against the data by probe_rewards
    function._tuneforge_required = [n for n in required if n not in fixed]
    function._tuneforge_where = where
    return function


def _checked(function: Callable, name: str, key: str, source: str) -> Callable:
    """Wrap a reward so a failure names the recipe key and file, and the result is one number per completion."""

    def reward(prompts, completions, **columns):
        try:
            values = function(prompts=prompts, completions=completions, **columns)
        except TuneforgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code
            raise RewardError(f"reward {name} ({source}) raised {type(exc).__name__}: {exc}", where=key,
                              fix="fix the function (it is called with prompts, completions and the data's columns "
                                  "as keyword arguments) or remove it from rl.rewards") from None
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {name} ({source}) returned {type(values).__name__}, not a list of numbers",
                              where=key, fix="return one float per completion") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {name} ({source}) returned {len(values)} values for {len(completions)} "
                              f"completions", where=key, fix="return one float per completion")
        out = []
        for value in values:
            if value is None:
                out.append(None)  # TRL: None = this reward does not apply to this example
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                raise RewardError(f"reward {name} ({source}) returned {value!r}; rewards must be finite numbers "
                                  f"(or None where the reward does not apply)", where=key)
            out.append(float(value))
        return out

    reward.__name__ = name
    return reward


# ---------------------------------------------------------------------------------------------------------------
# From the recipe


@dataclass
class Reward:
    name: str  # unique label (logged by TRL as rewards/<name>/mean)
    kind: str  # the built-in's name, or custom
    weight: float
    function: Callable  # (prompts, completions, **columns) -> list[float]
    binary: bool = True  # scores are 0/1: the pass rate is reported as an accuracy
    extra: dict = field(default_factory=dict)


_FACTORIES = {"exact_answer": exact_answer, "regex": regex, "json_schema": json_schema, "length": length,
              "code_tests": code_tests, "reward_model": reward_model}


def build_rewards(specs, *, base_dir: str | Path | None = None, device: str | None = None,
                  reward_model_path: str | None = None, trust_remote_code: bool = False) -> list[Reward]:
    """`rl.rewards` (+ rl.reward_model as one more reward) -> Reward objects. Files are read here; all problems are
    raised together."""
    base = Path(base_dir) if base_dir is not None else None
    out, problems, seen = [], [], {}
    items = [(f"rl.rewards.{i}", spec.name, spec.weight, dict(spec.options)) for i, spec in enumerate(specs)]
    if reward_model_path and not any(name == "reward_model" for _, name, _, _ in items):
        items.append(("rl.reward_model", "reward_model", 1.0, {"path": reward_model_path}))
    for key, name, weight, options in items:
        try:
            check_reward_spec(name, options)
            if name == "custom":
                path = Path(options["path"])
                if not path.is_absolute() and not path.exists() and base is not None:
                    for candidate in (base / path, base.parent / path):
                        if candidate.exists():
                            path = candidate
                            break
                function = load_custom_reward(path, options["function"], key=key)
                source = f"{path}:{options['function']}"
                label = options["function"]
            else:
                kwargs = dict(options, key=key)
                if name in ("json_schema", "reward_model"):
                    kwargs["base_dir"] = base
                if name == "reward_model":  # trust_remote_code: the user's recipe's, never the reward run's
                    kwargs.update(device=device, trust_remote_code=trust_remote_code)
                function = _FACTORIES[name](**kwargs)
                source, label = f"built-in {name}", name
        except ValueError as exc:
            problems.append(f"`{key}`: {exc}")
            continue
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        except TuneforgeError as exc:
            problems.append(exc.render())
            continue
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}_{seen[label]}"
        wrapped = _checked(function, label, key, source)
        out.append(Reward(label, name, weight, wrapped, binary=name not in ("reward_model", "custom", "length"),
                          extra={"key": key, "source": source, "raw": function}))
    if problems:
        raise RecipeError(problems)
    return out


def probe_rewards(rewards: list[Reward], example: dict) -> None:
    """Call every reward once on one training example (its own reference answer as the completion, when it has one)
    before training, so a broken custom reward or a missing data column fails in seconds, not after the first
    rollout."""
    prompt = example["prompt"]
    text = str(example.get("reference") or example.get("answer") or "")
    completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
    columns = {k: [v] for k, v in example.items() if k != "prompt"}
    problems = []
    for reward in rewards:
        missing = [n for n in getattr(reward.extra.get("raw"), "_tuneforge_required", []) if n not in columns]
        if missing:
            problems.append(f"{reward.extra['raw']._tuneforge_where}: it requires {', '.join(missing)}, which the data "
                            f"does not have (columns: {', '.join(columns) or '(none)'}); add the field(s) to every "
                            f"example or give the parameter(s) a default")
    if problems:
        raise RecipeError(problems)
    for reward in rewards:
        reward.function([prompt], [completion], **columns)


def score_all(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list]) -> dict:
    """Every reward on every completion -> {"total": [...], "per_reward": {name: [...]}} (None counts as 0)."""
    per = {}
    for reward in rewards:
        values = reward.function(prompts, completions, **columns)
        per[reward.name] = [0.0 if v is None else v for v in values]
    total = [sum(r.weight * per[r.name][i] for r in rewards) for i in range(len(completions))]
    return {"total": total, "per_reward": per}
