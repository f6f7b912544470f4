"""The recipe form, generated from the recipe schema itself (`Recipe.model_json_schema()` and the pydantic fields):
every key with its type, default and help text, grouped by section; no second copy of any default.

The page sends what the user typed as text, keyed by dotted path ({"train.lr": "1e-4"}), plus `extras`: YAML for keys
the form has no field for (an imported recipe's unknown keys, kept so that `parse_recipe` reports them). Here the text
becomes values of the field's type, the recipe dict and its YAML, and `parse_recipe` -- what the CLI calls -- says what
is wrong, each problem put back on its field."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache

from tuneforge.board.state import BoardError

SECTION_TITLES = {"": "General", "model": "Model", "data": "Data", "adapter": "Adapter", "quant": "Quantization (QLoRA)",
                  "train": "Training", "eval": "Evaluation", "distributed": "Several GPUs", "speed": "Speed",
                  "preference": "Preference methods", "rl": "Reward models and RL"}
OPEN_SECTIONS = ("", "model", "data", "adapter", "train")
SOURCE = "recipe.yaml"  # the name errors give for the recipe (the YAML view and the download use it too)


def _variants(prop: dict) -> tuple[list[dict], bool]:
    options = prop.get("anyOf") or [prop]
    return [o for o in options if o.get("type") != "null"], any(o.get("type") == "null" for o in options)


def _kind(prop: dict) -> tuple[str, list | None, bool]:
    """(kind, choices, nullable): kind is text | integer | number | choice | yaml (lists, mappings, mixed types)."""
    variants, nullable = _variants(prop)
    if len(variants) == 1:
        v = variants[0]
        if "enum" in v:
            return "choice", list(v["enum"]), nullable
        if v.get("type") == "boolean":
            return "choice", [True, False], nullable
        if v.get("type") in ("integer", "number"):
            return v["type"], None, nullable
        if v.get("type") == "string":
            return "text", None, nullable
        return "yaml", None, nullable
    consts = [v.get("const") for v in variants if "const" in v]
    if all(v.get("type") == "boolean" or "const" in v for v in variants):  # bool | "auto"
        return "choice", [*consts, True, False], nullable
    return "yaml", None, nullable


def yaml_text(value) -> str:
    """A value as the user would write it in the recipe (flow style for lists and mappings)."""
    import yaml

    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip().removesuffix("\n...")


def _constraint_text(prop: dict) -> str:
    variants, _ = _variants(prop)
    parts = []
    for v in variants:
        for key, sign in (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<=")):
            if key in v:
                parts.append(f"{sign} {v[key]:g}")
    return ", ".join(parts)


@lru_cache(maxsize=1)
def form_spec() -> dict:
    """Sections of fields for the page, from the schema: key, kind, choices, default, help, required."""
    from tuneforge.methods import method_names
    from tuneforge.recipe import Recipe

    schema = Recipe.model_json_schema()
    defs = schema["$defs"]
    sections: dict[str, dict] = {}

    def add(section: str, key: str, prop: dict, model_field, required: bool):
        kind, choices, nullable = _kind(prop)
        default = None if required else model_field.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = default.model_dump(mode="json")
        entry = {"key": key, "label": key.split(".")[-1], "kind": kind, "nullable": nullable, "required": required,
                 "help": model_field.description or prop.get("description", ""), "default": default,
                 "default_text": "required" if required else yaml_text(default), "limits": _constraint_text(prop)}
        if choices is not None:
            entry["choices"] = [{"value": yaml_text(c), "raw": c} for c in choices]
        if key == "method":
            entry["suggestions"] = method_names()
        sections.setdefault(section, {"key": section, "title": SECTION_TITLES.get(section, section),
                                      "open": section in OPEN_SECTIONS, "help": "", "fields": []})["fields"].append(entry)

    for name, prop in schema["properties"].items():
        field = Recipe.model_fields[name]
        ref = prop.get("$ref", "")
        if ref:  # a section: one field per key of it
            section_schema = defs[ref.rsplit("/", 1)[-1]]
            section_model = field.annotation
            required = set(section_schema.get("required", []))
            for key, sub in section_schema["properties"].items():
                add(name, f"{name}.{key}", sub, section_model.model_fields[key], key in required)
            sections[name]["help"] = field.description or section_schema.get("description", "")
        else:
            add("", name, prop, field, name in schema.get("required", []))
    ordered = [sections.pop("")] + list(sections.values())
    fields = {f["key"]: f for s in ordered for f in s["fields"]}
    return {"sections": ordered, "fields": fields, "source": SOURCE}


def _fields() -> dict:
    return form_spec()["fields"]


# ---------------------------------------------------------------------------------------------------------------
# Text <-> values


def _number(text: str, kind: str):
    if text.lower() in ("null", "none", "~"):
        return None
    try:
        value = int(text.replace("_", "")) if kind == "integer" else float(text)
    except ValueError:
        if kind == "integer":
            try:
                number = float(text)
            except ValueError:
                return text  # parse_recipe says "Input should be a valid integer" on the field
            return int(number) if number.is_integer() else number
        return text
    return value if not (isinstance(value, float) and math.isinf(value)) else text


def field_value(key: str, text: str):
    """The value the text of field `key` stands for (raises BoardError for YAML that does not parse)."""
    field = _fields()[key]
    kind = field["kind"]
    if field["nullable"] and text.strip().lower() in ("null", "~", "none"):
        return None
    if kind == "text":
        return text
    if kind in ("integer", "number"):
        return _number(text.strip(), kind)
    if kind == "choice":
        return next((choice["raw"] for choice in field["choices"] if choice["value"] == text), text)
    return _yaml_value(text, key)


def _yaml_value(text: str, where: str):
    import yaml

    from tuneforge.recipe_yaml import load_yaml_bounded

    try:
        return load_yaml_bounded(text, f"`{where}`")
    except yaml.YAMLError as exc:
        raise _FieldProblem(where, f"`{where}`: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


class _FieldProblem(Exception):
    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(message)


def build_recipe(values: dict, extras: str = "") -> tuple[dict, list[tuple[str, str]]]:
    """(recipe dict as written, problems the text itself has (key, message)): the fields' values, then the keys of
    `extras` (YAML) that no field set."""
    from tuneforge.errors import RecipeError

    problems: list[tuple[str, str]] = []
    data: dict = {}
    fields = _fields()
    for key in fields:  # schema order, so the YAML reads like the form
        text = values.get(key)
        if text is None or (isinstance(text, str) and not text.strip()):
            continue
        if not isinstance(text, str):
            raise BoardError(f"field {key}: expected text, got {type(text).__name__}")
        try:
            value = field_value(key, text)
        except (_FieldProblem, RecipeError) as exc:
            problems.append((key, exc.message if isinstance(exc, _FieldProblem) else "; ".join(exc.problems)))
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    _merge_extras(data, extras, problems)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BoardError(f"the form sent unknown field(s) {', '.join(unknown[:5])}; reload the page")
    return data, problems


def _merge_extras(data: dict, extras: str, problems: list) -> None:
    """Keys of the `extras` YAML that the fields did not set, after them (a field's value wins)."""
    from tuneforge.errors import RecipeError

    if not extras.strip():
        return
    try:
        parsed = _yaml_value(extras, "extras")
    except (_FieldProblem, RecipeError) as exc:
        problems.append(("extras", exc.message if isinstance(exc, _FieldProblem) else "; ".join(exc.problems)))
        return
    if parsed is None:
        return
    if not isinstance(parsed, dict):
        problems.append(("extras", "other keys: give a YAML mapping (key: value lines)"))
        return
    for key, value in parsed.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**value, **data[key]}
        else:
            data.setdefault(key, value)


def split_recipe(data: dict) -> tuple[dict, str]:
    """The reverse of `build_recipe`: (field texts, YAML of the keys that have no field)."""
    import yaml

    fields = _fields()
    values: dict[str, str] = {}
    extras: dict = {}
    if isinstance(data.get("model"), str):
        data = {**data, "model": {"name": data["model"]}}
    for key, value in data.items():
        if key in fields:
            if not (value is None and fields[key]["default"] is None):
                values[key] = yaml_text(value)
        elif isinstance(value, dict) and any(k.startswith(f"{key}.") for k in fields):
            for sub, sub_value in value.items():
                if f"{key}.{sub}" in fields:
                    if not (sub_value is None and fields[f"{key}.{sub}"]["default"] is None):
                        values[f"{key}.{sub}"] = yaml_text(sub_value)
                else:
                    extras.setdefault(key, {})[sub] = sub_value
        else:
            extras[key] = value
    return values, (yaml.safe_dump(extras, sort_keys=False, allow_unicode=True) if extras else "")


def recipe_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100) if data else ""


def problem_key(problem: str) -> str | None:
    """The recipe key a CLI problem line (or a doctor finding's `where`) names first: "`train.lr` (recipe.yaml:3): ..."
    -> "train.lr"; a bare "data.train" too."""
    match = re.match(r"\s*`([^`]+)`", problem) or re.match(r"\s*([A-Za-z_]\w*(?:\.\w+)*)\b", problem)
    return match.group(1) if match else None


def place_problem(key: str | None, extras_keys: set[str]) -> str:
    """The field (or "extras", or "" for the page) a problem about `key` is shown on."""
    fields = _fields()
    if not key:
        return ""
    parts = key.split(".")
    if parts[0] in extras_keys or ".".join(parts[:2]) in extras_keys:
        return "extras"
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in fields:
            return ".".join(parts[:n])
    section = [f["key"] for f in fields.values() if f["key"].startswith(f"{parts[0]}.") and f["required"]]
    return section[0] if section else ""


def check_recipe(values: dict, extras: str = "") -> dict:
    """Validate what the form holds, as the CLI would: {ok, yaml, errors: {field: [...]}, problems: [...], recipe}."""
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import parse_recipe

    data, text_problems = build_recipe(values, extras)
    text = recipe_yaml(data)
    extras_keys = _extras_keys(data, values)
    errors: dict[str, list[str]] = {}
    problems = [message for _, message in text_problems]
    for key, message in text_problems:
        errors.setdefault(key, []).append(message)
    recipe = None
    if not text_problems:
        try:
            recipe = parse_recipe(data, source=SOURCE, text=text)
        except RecipeError as exc:
            problems = list(exc.problems)
            for problem in exc.problems:
                errors.setdefault(place_problem(problem_key(problem), extras_keys), []).append(problem)
    return {"ok": recipe is not None, "yaml": text, "errors": errors, "problems": problems, "data": data,
            "recipe": recipe, "name": data.get("name")}


def _extras_keys(data: dict, values: dict) -> set[str]:
    fields = _fields()
    keys = set()
    for key, value in data.items():
        if key not in fields and not any(k.startswith(f"{key}.") for k in fields):
            keys.add(key)
        elif isinstance(value, dict):
            keys.update(f"{key}.{sub}" for sub in value if f"{key}.{sub}" not in fields)
    return keys


def public(result: dict) -> dict:
    """A check result as JSON for the page (without the Recipe object)."""
    return {k: v for k, v in result.items() if k not in ("recipe", "data")}


def json_safe(value):
    return json.loads(json.dumps(value, default=str))
