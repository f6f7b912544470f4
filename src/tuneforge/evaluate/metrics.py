"""Generation metrics. Each scores predictions against references; `score` reports every metric as a percentage.

A metric is named in the recipe's `eval.metrics` either by name or as a mapping with options:

    eval:
      metrics:
        - exact_match                                  # defaults
        - {name: exact_match, ignore_case: true, ignore_punctuation: true, label: em_loose}
        - {name: regex, pattern: '^\\{.*\\}$'}          # pattern omitted: the reference is the pattern
        - {name: json_schema, schema: schemas/order.json}   # or schema: {type: object, required: [name]}
        - rouge_l
        - {name: pass_at_k, k: 1, timeout: 10}
        - {name: custom, path: my_metrics.py, function: score_answer}

Two kinds of metric:
- per example: `function(prediction, reference, **options) -> float in [0, 1]` (or bool); the score is the mean;
- corpus: `function(predictions, references, **options) -> float in [0, 1]`, for metrics that are not a mean
  over examples (macro-F1, pass@k with several candidates per problem).

Add a built-in metric by writing the function and registering it in METRICS with its options.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuneforge.errors import RecipeError

# ---------------------------------------------------------------------------------------------------------------
# Normalisation


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
              ignore_whitespace: bool = False, ignore_articles: bool = False) -> str:
    """Whitespace at the ends is never part of an answer; the rest is folded only when asked.

    ignore_whitespace collapses every run of whitespace to one space (SQuAD-style normalisation is all four on).
    """
    text = str(text).strip()
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    if ignore_articles:
        text = _ARTICLES.sub(" ", text)
    if ignore_whitespace or ignore_articles or ignore_punctuation:
        text = " ".join(text.split())
    return text


_NORMALIZE_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_whitespace", "ignore_articles")


def _norm_options(options: dict) -> dict:
    return {k: bool(options.get(k, False)) for k in _NORMALIZE_OPTIONS}


# ---------------------------------------------------------------------------------------------------------------
# Per-example metrics


def exact_match(prediction: str, reference: str, **options) -> float:
    norm = _norm_options(options)
    return float(normalize(prediction, **norm) == normalize(reference, **norm))


def contains(prediction: str, reference: str, **options) -> float:
    norm = _norm_options(options)
    return float(normalize(reference, **norm) in normalize(prediction, **norm))


def regex_match(prediction: str, reference: str, *, pattern: str | None = None, fullmatch: bool = False,
                ignore_case: bool = False, _compiled=None) -> float:
    """The prediction matches `pattern` (searched anywhere, or the whole answer with fullmatch). Without a
    pattern the reference itself is the pattern, so each example can carry its own."""
    regex = _compiled if _compiled is not None else _compile(pattern if pattern is not None else reference, ignore_case)
    text = prediction.strip()
    return float(bool(regex.fullmatch(text) if fullmatch else regex.search(text)))


def _compile(pattern: str, ignore_case: bool):
    return re.compile(pattern, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_+-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """```json ... ``` (or any language tag) -> its content; anything else unchanged."""
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _parse_json(prediction: str, allow_fence: bool):
    text = strip_code_fence(prediction) if allow_fence else prediction
    return json.loads(text)


def json_valid(prediction: str, reference: str = "", *, allow_fence: bool = False) -> float:
    """The whole answer parses as JSON (allow_fence: a ```json fence around it is accepted)."""
    try:
        _parse_json(prediction, allow_fence)
    except (json.JSONDecodeError, TypeError, ValueError):
        return 0.0
    return 1.0


def json_schema(prediction: str, reference: str = "", *, schema=None, allow_fence: bool = False, _validator=None) -> float:
    """The answer parses as JSON and validates against the schema (a JSON Schema of any draft; its `$schema`
    picks the draft, default 2020-12)."""
    validator = _validator if _validator is not None else _schema_validator(schema, "schema")
    try:
        value = _parse_json(prediction, allow_fence)
    except (json.JSONDecodeError, TypeError, ValueError):
        return 0.0
    return float(validator.is_valid(value))


def _schema_validator(schema, where: str):
    """A jsonschema validator for a schema given inline (mapping, or JSON text) or as a .json/.yaml file path."""
    import jsonschema

    if schema is None:
        raise RecipeError([f"{where}: json_schema needs a `schema` (a file path, or the schema inline)"])
    if isinstance(schema, str):
        text = schema.strip()
        if text.startswith("{"):
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecipeError([f"{where}: the inline schema is not valid JSON ({exc})"]) from None
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise RecipeError([f"{where}: schema file {path} not found (give a path, or the schema inline)"])
            try:
                if path.suffix in (".yaml", ".yml"):
                    import yaml

                    schema = yaml.safe_load(path.read_text(encoding="utf-8"))
                else:
                    schema = json.loads(path.read_text(encoding="utf-8"))
            except Exception as exc:  # JSON or YAML syntax error: name the file
                raise RecipeError([f"{where}: schema file {path} does not parse: {exc}"]) from None
    if not isinstance(schema, (dict, bool)):
        raise RecipeError([f"{where}: a JSON Schema must be an object (got {type(schema).__name__})"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise RecipeError([f"{where}: the schema itself is invalid: {exc.message}"]) from None
    return cls(schema)


_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's default tokenisation: lower case, runs of letters and digits (punctuation dropped)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: LCS of the token sequences, harmonic mean of LCS/len(prediction) and LCS/len(reference)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def label_of(text: str) -> str:
    """A class label as compared by accuracy and macro-F1: case, outer whitespace and trailing punctuation folded."""
    return " ".join(str(text).strip().lower().split()).rstrip(".!;:,")


def accuracy(prediction: str, reference: str) -> float:
    """Label accuracy: the predicted label equals the reference label (see `label_of` for what is folded)."""
    return float(label_of(prediction) == label_of(reference))


# ---------------------------------------------------------------------------------------------------------------
# Corpus metrics


def macro_f1(predictions: list[str], references: list[str], *, labels: list[str] | None = None) -> float:
    """Mean over classes of each class's F1. The classes are `labels` if given, else those in the references: a
    prediction outside them counts against the recall of its true class but adds no class of its own (a model
    that rambles is not rewarded or punished twice)."""
    preds = [label_of(p) for p in predictions]
    refs = [label_of(r) for r in references]
    classes = [label_of(x) for x in labels] if labels else sorted(set(refs))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        fp = sum(p == c and r != c for p, r in zip(preds, refs))
        fn = sum(p != c and r == c for p, r in zip(preds, refs))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c pass (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (got {n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k(predictions: list, references: list[str], *, k: int = 1, timeout: float = 10.0, memory_mb: int = 1024,
              tests: list[str] | None = None, workers: int | None = None, details: list | None = None) -> float:
    """Code pass@k: each candidate program (code fences stripped) is followed by the problem's tests and run in
    the sandbox (evaluate/sandbox.py: no network, time and memory limits); it passes if it exits 0.

    predictions: one candidate per problem, or a list of n >= k candidates per problem.
    tests: test code per problem (asserts); if not given, the reference is the test code.
    details: if a list is given, one {"passed": [..bools..], "errors": [...]} per problem is appended to it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tuneforge.evaluate.sandbox import run_python

    tests = tests if tests is not None else references
    candidates = [p if isinstance(p, (list, tuple)) else [p] for p in predictions]
    jobs = [(i, strip_code_fence(c) + "\n\n" + tests[i] + "\n") for i, cs in enumerate(candidates) for c in cs]
    import os

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda job: run_python(job[1], timeout=timeout, memory_mb=memory_mb), jobs))
    per_problem: list[list] = [[] for _ in candidates]
    for (i, _), result in zip(jobs, results):
        per_problem[i].append(result)
    if details is not None:
        for runs in per_problem:
            details.append({"passed": [r.passed for r in runs],
                            "errors": [None if r.passed else ("timeout" if r.timed_out else r.stderr.strip()[-300:])
                                       for r in runs]})
    scores = [pass_at_k_estimate(len(runs), sum(r.passed for r in runs), k) for runs in per_problem]
    return sum(scores) / max(1, len(scores))


# ---------------------------------------------------------------------------------------------------------------
# Registry and specs


@dataclass(frozen=True)
class Metric:
    function: Callable
    corpus: bool = False  # True: function(predictions, references, **options); else per example, averaged
    options: tuple[str, ...] = ()  # option names the recipe may set
    description: str = ""


METRICS: dict[str, Metric] = {
    "exact_match": Metric(exact_match, options=_NORMALIZE_OPTIONS,
                          description="answer equals the reference (after optional normalisation)"),
    "contains": Metric(contains, options=_NORMALIZE_OPTIONS, description="answer contains the reference"),
    "regex": Metric(regex_match, options=("pattern", "fullmatch", "ignore_case"),
                    description="answer matches a pattern (default: the reference is the pattern)"),
    "json_valid": Metric(json_valid, options=("allow_fence",), description="answer parses as JSON"),
    "json_schema": Metric(json_schema, options=("schema", "allow_fence"),
                          description="answer is JSON valid against a JSON Schema (file or inline)"),
    "rouge_l": Metric(rouge_l, description="ROUGE-L F1 (longest common subsequence of words)"),
    "accuracy": Metric(accuracy, description="label equals the reference label (case/punctuation folded)"),
    "macro_f1": Metric(macro_f1, corpus=True, options=("labels",), description="mean per-class F1 of labels"),
    "pass_at_k": Metric(pass_at_k, corpus=True, options=("k", "timeout", "memory_mb", "workers"),
                        description="code: share of problems whose candidate passes the tests, sandboxed"),
}
# Options every metric takes: `label` names the result (to use one metric twice with different options).
COMMON_OPTIONS = ("label",)


@dataclass
class MetricSpec:
    """One metric as the recipe names it: a registered name (or `custom`) and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        """The name the result is reported under."""
        if self.label:
            return self.label
        if self.name == "pass_at_k":
            return f"pass@{self.options.get('k', 1)}"
        if self.name == "custom":
            return str(self.options.get("function", "custom"))
        return self.name


def parse_metric_spec(item, *, where: str = "eval.metrics", base_dir: str | Path | None = None) -> MetricSpec:
    """A recipe entry -> MetricSpec. Accepts "name", {name: x, ...options}, {x: {...options}} or a MetricSpec.
    Relative file paths (json_schema's schema, custom's path) are resolved against base_dir when it has them."""
    if isinstance(item, MetricSpec):
        spec = MetricSpec(item.name, dict(item.options), item.label)
    elif isinstance(item, str):
        spec = MetricSpec(item)
    elif isinstance(item, dict) and "name" in item:
        options = {k: v for k, v in item.items() if k not in ("name", "label")}
        spec = MetricSpec(str(item["name"]), options, item.get("label"))
    elif isinstance(item, dict) and len(item) == 1:
        (name, options), = item.items()
        options = dict(options or {})
        spec = MetricSpec(str(name), {k: v for k, v in options.items() if k != "label"}, options.get("label"))
    else:
        raise RecipeError([f"`{where}`: a metric is a name or a mapping with `name:` and options (got {item!r})"])
    known = sorted(set(METRICS) | {"custom"})
    if spec.name not in known:
        import difflib

        close = difflib.get_close_matches(spec.name, known, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(known)}"
        raise RecipeError([f"`{where}`: unknown metric `{spec.name}`; {hint}"])
    allowed = ("path", "function") if spec.name == "custom" else METRICS[spec.name].options
    unknown = [k for k in spec.options if k not in allowed]
    if unknown:
        raise RecipeError([f"`{where}`: unknown option `{k}` for metric {spec.name}; "
                           f"its options: {', '.join(allowed) or '(none)'}" for k in unknown])
    if base_dir is not None:
        for key in ("schema", "path"):
            value = spec.options.get(key)
            if isinstance(value, str) and not value.strip().startswith("{") and not Path(value).is_absolute():
                candidate = Path(base_dir) / value
                if not Path(value).exists() and candidate.exists():
                    spec.options[key] = str(candidate)
    return spec


@dataclass
class _Bound:
    """A spec resolved once (schemas loaded, patterns compiled, custom code imported) before scoring."""

    spec: MetricSpec
    function: Callable
    corpus: bool
    options: dict


def _bind(spec: MetricSpec, where: str) -> _Bound:
    options = dict(spec.options)
    if spec.name == "custom":
        path, name = options.get("path"), options.get("function")
        if not path or not name:
            raise RecipeError([f"`{where}`: a custom metric needs `path` (a .py file) and `function` (its name)"])
        function = load_custom_metric(path, name)
        return _Bound(spec, function, bool(getattr(function, "corpus", False)), {})
    metric = METRICS[spec.name]
    if spec.name == "json_schema":
        options = {"_validator": _schema_validator(options.get("schema"), f"{where}.schema"),
                   "allow_fence": options.get("allow_fence", False)}
    elif spec.name == "regex" and options.get("pattern") is not None:
        try:
            options["_compiled"] = _compile(options["pattern"], bool(options.get("ignore_case", False)))
        except re.error as exc:
            raise RecipeError([f"`{where}.pattern`: not a valid regular expression ({exc})"]) from None
    elif spec.name == "pass_at_k":
        k = options.get("k", 1)
        if not isinstance(k, int) or k < 1:
            raise RecipeError([f"`{where}.k`: must be a whole number >= 1 (got {k!r})"])
    return _Bound(spec, metric.function, metric.corpus, options)


def load_custom_metric(path: str | Path, function_name: str) -> Callable:
    """Import `function_name` from the Python file at `path`.

    The function takes (prediction, reference) and returns a float in [0, 1] or a bool; the score is the mean.
    Set `function.corpus = True` on it to receive (predictions, references) lists and return one float instead.
    """
    import inspect

    from tuneforge.user_code import import_user_function

    where = f"custom metric {Path(path).expanduser()}:{function_name}"
    function = import_user_function(path, function_name, where=where, kind="metric")
    try:
        params = [p for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        takes_varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        params, takes_varargs = [None, None], True
    if len(params) != 2 and not takes_varargs:
        raise RecipeError([f"{where}: must take two arguments (prediction, reference), or (predictions, references) "
                           f"with `{function_name}.corpus = True`; it takes {len(params)}"])
    return function


def _check_value(value, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or isinstance(value, complex) or math.isnan(value) or not 0 <= value <= 1:
        raise RecipeError([f"{where}: a metric must return a number in [0, 1] or a bool (got {value!r})"])
    return float(value)


def resolve_metrics(items, *, where: str = "eval.metrics", base_dir: str | Path | None = None) -> list[MetricSpec]:
    """Parse every entry and check each can be bound (schema files read, custom files imported, patterns compiled),
    so a bad metric fails before any model is loaded. All problems are raised together."""
    specs, problems = [], []
    for i, item in enumerate(items):
        try:
            spec = parse_metric_spec(item, where=f"{where}[{i}]", base_dir=base_dir)
            _bind(spec, f"{where}[{i}]")
            specs.append(spec)
        except RecipeError as exc:
            problems.extend(exc.problems)
    keys = [s.key for s in specs]
    problems += [f"`{where}`: two metrics report as `{k}`; give one a `label:`" for k in sorted(set(keys)) if keys.count(k) > 1]
    if problems:
        raise RecipeError(problems)
    return specs


def score(predictions: list, references: list[str], names: list, *, tests: list[str] | None = None,
          details: dict | None = None) -> dict[str, float]:
    """Each metric over the examples, as a percentage. `names` holds metric names, recipe mappings or MetricSpecs.

    tests: per-example test code for pass_at_k (else the references are the tests).
    details: if a dict is given, per-example scores (and pass@k run results) are stored in it under each key.
    """
    out = {}
    for i, item in enumerate(names):
        where = f"eval.metrics[{i}]"
        bound = _bind(parse_metric_spec(item, where=where), where)
        key = bound.spec.key
        if bound.spec.name == "pass_at_k":
            runs: list = []
            value = pass_at_k(predictions, references, tests=tests, details=runs, **bound.options)
            if details is not None:
                details[key] = runs
        elif bound.corpus:
            plain = [p[0] if isinstance(p, (list, tuple)) else p for p in predictions]
            value = _check_value(bound.function(plain, references, **bound.options), f"metric {key}")
        else:
            values = [_check_value(bound.function(p[0] if isinstance(p, (list, tuple)) else p, r, **bound.options),
                                   f"metric {key}") for p, r in zip(predictions, references)]
            value = sum(values) / max(1, len(values))
            if details is not None:
                details[key] = values
        out[key] = 100.0 * value
    return out
