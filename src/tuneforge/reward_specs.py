"""The built-in rewards' names and options, checked when a recipe loads (`rl.rewards.N`). Kept apart from rewards.py
(which builds and runs the functions) so the recipe schema can check a reward's options without importing what
scores them."""

from __future__ import annotations

import re

# name -> (required options, optional options, description)
BUILTINS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "exact_answer": ((), ("field", "pattern", "fallback_last_number", "tolerance"),
                     "the final numeric answer equals the data's answer"),
    "regex": (("pattern",), ("fullmatch", "ignore_case"), "the completion matches a pattern (format)"),
    "json_schema": ((), ("schema", "field", "allow_fence"), "the completion is JSON valid against a schema"),
    "length": (("max",), ("min", "unit"), "the completion's length lies in [min, max]"),
    "code_tests": ((), ("field", "timeout", "memory_mb"), "the completion's code passes the data's tests (sandboxed)"),
    "reward_model": (("path",), ("batch_size",), "a trained reward model's score"),
    "custom": (("path", "function"), (), "a function from a Python file"),
}



def check_reward_spec(name: str, options: dict) -> None:
    """Raised as ValueError so the recipe reports it on `rl.rewards.N` with its line."""
    if name not in BUILTINS:
        raise ValueError(f"unknown reward {name!r}; built-ins: {', '.join(BUILTINS)} (custom: {{name: custom, options: "
                         f"{{path: file.py, function: name}}}})")
    required, optional, _ = BUILTINS[name]
    unknown = sorted(set(options) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"reward {name} has no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(required + optional) or '(none)'}")
    missing = [k for k in required if options.get(k) in (None, "")]
    if missing:
        raise ValueError(f"reward {name} needs option(s) {', '.join(missing)} (under options:)")
    if name == "regex":
        try:
            re.compile(options["pattern"])
        except (re.error, TypeError) as exc:
            raise ValueError(f"options.pattern is not a valid regular expression ({exc})") from None
    if name == "exact_answer" and "pattern" in options:
        try:
            if re.compile(options["pattern"]).groups < 1:
                raise ValueError("options.pattern must have a group (...) around the number")
        except (re.error, TypeError) as exc:
            raise ValueError(f"options.pattern is not a valid regular expression ({exc})") from None
    if name == "length":
        lo, hi = options.get("min", 0), options["max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not 0 <= lo <= hi or hi <= 0:
            raise ValueError(f"length needs 0 <= min <= max and max > 0 (got min={lo!r}, max={hi!r})")
        if options.get("unit", "chars") not in ("chars", "words"):
            raise ValueError(f"length unit must be chars or words (got {options['unit']!r})")
    if name == "code_tests":
        timeout = options.get("timeout", 5)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"code_tests timeout must be a positive number of seconds (got {timeout!r})")
