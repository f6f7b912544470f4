"""Running the checks: `run_doctor` on what it is given, `doctor_recipe` loading the tokenizer, the model's config
(no weights) and the prepared data first, with load failures turned into findings."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import DataError, ModelError, TuneforgeError
from tuneforge.guide.doctor import adapter, hardware, preference_rl, schedule
from tuneforge.guide.doctor.adapter_menu import check_adapter_menu
from tuneforge.guide.doctor import data as data_checks
from tuneforge.guide.doctor.core import Check, Context, Finding, by_severity
from tuneforge.methods import method_spec

# Every check, in the order it runs (findings keep this order within a severity).
CHECKS: list[Check] = [
    schedule.check_learning_rate, schedule.check_effective_batch, schedule.check_epochs, schedule.check_warmup,
    schedule.check_eval_frequency,
    data_checks.check_validation_set, data_checks.check_eval_size, data_checks.check_train_eval_overlap,
    data_checks.check_duplicates, data_checks.check_chat_template, data_checks.check_prompt_masking,
    data_checks.check_stop_token,
    preference_rl.check_preference_start, preference_rl.check_rl,
    adapter.check_target_modules, adapter.check_new_tokens, check_adapter_menu,
    data_checks.check_context_length, data_checks.check_truncation, data_checks.check_packing,
    data_checks.check_curriculum,
    hardware.check_precision, adapter.check_qlora_optimizer, hardware.check_memory,
]


def run_doctor(recipe, *, tokenizer=None, data=None, model_config=None, device_info=None, source: str | None = None,
               data_format: str | None = None, native_chat_template: str | None = None) -> list[Finding]:
    """Run every check that its inputs allow; loads nothing itself (see `doctor_recipe` for that).

    `recipe` is a Recipe. `source` is the recipe file, for `file:line` locations (default: the file it was loaded
    from). `native_chat_template` is the template the model ships with (to detect a recipe override that differs)."""
    key_lines = {}
    source = source or recipe.source_path
    if source:
        try:
            from tuneforge.recipe import _key_lines

            key_lines = _key_lines(Path(source).read_text(encoding="utf-8"))
        except OSError:
            pass
    ctx = Context(recipe=recipe, tokenizer=tokenizer, data=data, model_config=model_config, device_info=device_info,
                  source=str(source) if source else None, data_format=data_format,
                  native_chat_template=native_chat_template, key_lines=key_lines)
    findings: list[Finding] = []
    for function in CHECKS:
        findings.extend(function(ctx))
    return by_severity(findings)


def doctor_recipe(recipe, *, tokenizer=None, data=None, model_config=None, device_info=None,
                  overrides: list[str] | None = None, source: str | None = None) -> list[Finding]:
    """Doctor a recipe (a path, or a loaded Recipe): loads the tokenizer, the model's config (no weights) and the
    prepared data unless given, turns load failures into findings, then runs every check. `device_info` defaults
    to this machine (`detect_device`); pass `device_from_gpu("H100")` to check for another machine. `source` is
    the recipe file of a loaded Recipe, for file:line locations (default: the file it was loaded from)."""
    from tuneforge.recipe import load_recipe

    findings: list[Finding] = []
    if isinstance(recipe, (str, Path)):
        source = str(recipe)
        recipe = load_recipe(recipe, overrides)  # a recipe that does not validate raises RecipeError as usual
    source = source or recipe.source_path
    name = recipe.model.name
    if model_config is None:
        from tuneforge.guide.plan import load_model_config

        try:
            model_config = load_model_config(name, trust_remote_code=recipe.model.trust_remote_code,
                                             revision=recipe.model.revision)
        except TuneforgeError as exc:
            findings.append(Finding("error", "model-unreadable", exc.message, "nothing about the model can be checked or trained",
                                    exc.fix or "check model.name", "`model.name`"))
    native = None
    if tokenizer is None:
        from tuneforge.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
            native = tokenizer.chat_template
            if recipe.model.chat_template:
                template = recipe.model.chat_template
                path = Path(template)
                tokenizer.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else template
        except TuneforgeError as exc:
            if not any(f.code == "model-unreadable" for f in findings):
                findings.append(Finding("error", "model-unreadable", exc.message, "the tokenizer is needed to check the data",
                                        exc.fix or "check model.name", "`model.name`"))
    elif recipe.model.chat_template:
        native = _native_template(recipe)
    data_format = None
    spec = method_spec(recipe.method)
    if data is None and tokenizer is not None:
        try:
            data = _prepare(recipe, tokenizer, spec)
        except ModelError as exc:
            if exc.where != "model.chat_template":  # a missing template is check_chat_template's finding
                findings.append(_load_finding(exc))
        except TuneforgeError as exc:
            findings.append(_load_finding(exc))
        if data is None and spec.data in ("conversations", "text"):  # the formats load_examples reads
            data_format = _detect_format(recipe)
    if device_info is None:
        device_info = hardware.detect_device()
    findings.extend(run_doctor(recipe, tokenizer=tokenizer, data=data, model_config=model_config, device_info=device_info,
                               source=source, data_format=data_format, native_chat_template=native))
    return by_severity(findings)


def _prepare(recipe, tokenizer, spec):
    """The data as `train` prepares it for this method's data kind: a PreparedData of SFT-style examples (pairs keep
    their chosen side) that the checks read, or None for RL prompts, which are read and checked (their errors become
    findings) but hold no examples the checks could read."""
    from tuneforge.recipe import resolve_path

    resolve = lambda value: resolve_path(recipe, value)  # noqa: E731
    if spec.data == "pairs":
        from tuneforge.data.preference import prepare_preference_data

        prepared = prepare_preference_data(recipe, tokenizer, resolve)
        if spec.family == "reward" and not getattr(prepared, "accuracy_pairs", None):  # as scores.PairwiseScorer
            raise DataError("no held-out pairs to measure the reward model's accuracy on", where="data.eval",
                            fix="give data.eval, or more pairs so data.eval_fraction holds some out")
        return prepared
    if spec.data == "prompts":
        from tuneforge.data.prompts import prepare_prompt_data

        prepare_prompt_data(recipe, tokenizer, resolve)
        return None
    if spec.data == "labels":  # method classify: {text, label} records, read and checked the same way
        from tuneforge.data.labels import prepare_label_data

        prepare_label_data(recipe, tokenizer, resolve)
        return None
    from tuneforge.data.pipeline import prepare_data

    return prepare_data(recipe, tokenizer, resolve=resolve)


def _native_template(recipe) -> str | None:
    try:
        from tuneforge.models import load_tokenizer

        return load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code,
                              revision=recipe.model.revision).chat_template
    except Exception:
        return None


def _detect_format(recipe) -> str | None:
    try:
        from tuneforge.data.pipeline import load_examples
        from tuneforge.recipe import resolve_path

        _, fmt = load_examples(resolve_path(recipe, recipe.data.sources("train")[0].path), recipe.data.format, split=recipe.data.split, limit=50)
        return fmt
    except Exception:
        return None


def _load_finding(exc: TuneforgeError) -> Finding:
    return Finding("error", "data-error", exc.message, "the data cannot be prepared, so `train` would stop here",
                   exc.fix or "fix the data file", exc.where or "`data.train`")
