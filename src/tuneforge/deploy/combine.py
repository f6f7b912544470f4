"""`tuneforge combine`: several fine-tuned runs on one base -> one model, scored on every source's held-out set.

LoRA/QLoRA runs go through PEFT's `add_weighted_adapter` (the result is one adapter on the shared, un-quantized base):
  linear       -> "cat": the adapters' updates, each times its weight, summed exactly (rank = sum of the ranks).
                  PEFT's own "linear" averages the A and B factors separately, which is not the weighted sum of
                  the updates; its documentation calls it a rough approximation.
  ties, dare_ties, dare_linear -> "ties_svd", "dare_ties_svd", "dare_linear_svd": TIES / DARE on each layer's update
                  B@A (the task vector), then an SVD back to a LoRA of rank = the sum of the ranks. The factor-wise
                  variants ("ties", ...) elect signs on A and B separately, which a LoRA's sign symmetry makes
                  arbitrary.
  slerp        -> PEFT has no slerp for adapters: both runs are merged into full models (ops/merge.py) and those
                  are combined as below.
Full fine-tuning runs go through mergekit (linear, slerp, ties, dare_ties, dare_linear); ties and dare use the
runs' shared base as the base model. Adapter weights scale each update as given; mergekit normalizes full-model
weights to sum to 1 (its default for linear, ties and dare).

The output is laid out like a run directory (recipe.yaml of the first source, status.json "completed" with
`combined_from`, adapter/ or model/) so eval, generate, chat and export take it, plus combine.json: the settings
and the scores table (rows: each source's held-out set x metric; columns: every source and the combination).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from tuneforge.artifacts import make_portable
from tuneforge.deploy.gguf_convert import ExportError
from tuneforge.errors import RunDirError

METHODS = ("linear", "ties", "dare_ties", "dare_linear", "slerp")
PEFT_TYPES = {"linear": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd", "dare_linear": "dare_linear_svd"}
OUTPUT_ENTRIES = ("recipe.yaml", "status.json", "adapter", "model", "combine.json")
COMBINED = "combined"


def parse_weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ExportError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.5,0.5",
                          where="--weights") from None
    if len(weights) != n:
        raise ExportError(f"--weights has {len(weights)} value(s) for {n} sources", where="--weights",
                          fix="give one weight per source, in the same order")
    if not all(math.isfinite(w) for w in weights) or not any(weights):
        raise ExportError(f"--weights {text!r}: every weight must be a finite number and not all of them zero",
                          where="--weights", fix="e.g. --weights 0.5,0.5")
    return weights


def _check_output(target: Path, overwrite: bool) -> None:
    from tuneforge.run import RUN_MARKER, refuse_if_in_use

    refuse_if_in_use(target, "combine into it")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise RunDirError(f"--output {target} is a file or a link; combine writes a folder", fix="choose another --output")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise RunDirError(f"{target} already exists", fix="pass --overwrite or choose another --output")
    foreign = [e.name for e in target.iterdir() if e.name not in OUTPUT_ENTRIES]
    if (target / RUN_MARKER).exists() or not (target / "combine.json").is_file() or foreign:
        raise RunDirError(f"{target} is not an earlier combine output; --overwrite refuses to delete it",
                          fix="choose another --output")


def check_sources(sources: list[str], method: str, weights: list[float], density: float | None,
                  trust_remote_code: bool, max_examples: int | None = None):
    """The finished runs and their recipes, after every check on the command line (ExportError / RunDirError)."""
    from tuneforge.models import open_text_run

    if method not in METHODS:
        raise ExportError(f"unknown combine method {method!r}", where="--method", fix=f"use one of: {', '.join(METHODS)}")
    if len(sources) < 2:
        raise ExportError("combine needs at least two runs", where="SOURCES")
    if method == "slerp" and len(sources) != 2:
        raise ExportError(f"slerp interpolates between exactly two models, got {len(sources)}", where="--method",
                          fix="pass two runs, or use linear / ties / dare_ties / dare_linear")
    if max_examples is not None and max_examples < 1:
        raise ExportError(f"--max-examples {max_examples}: give at least 1 (or leave it out for every example)",
                          where="--max-examples")
    if density is not None and (method in ("linear", "slerp") or not 0 < density <= 1):
        raise ExportError(f"--density {density}: it applies to ties and dare only, and lies in (0, 1]", where="--density")
    if method == "slerp" and (min(weights) < 0 or sum(weights) <= 0):
        raise ExportError("slerp takes two non-negative weights (t = the second's share)", where="--weights")
    runs, recipes = [], []
    for source in sources:
        run, recipe = open_text_run(source, "tuneforge combine", trust_remote_code=trust_remote_code)
        runs.append(run)
        recipes.append(recipe)
    bases = {(r.model.name, r.model.revision) for r in recipes}
    if len(bases) > 1:
        raise ExportError(f"the runs start from different base models ({sorted(b[0] for b in bases)}); combining "
                          "only makes sense on one base", where="SOURCES", fix="combine runs trained from the same model")
    kinds = {r.uses_lora for r in recipes}
    if len(kinds) > 1:
        raise ExportError("some runs trained adapters and some the full model", where="SOURCES",
                          fix="merge the adapter runs first (tuneforge merge) or combine runs of one kind")
    return runs, recipes


def combine(sources: list[str], *, method: str, weights: list[float], density: float | None, output: str,
            overwrite: bool = False, max_examples: int | None = None, seed: int = 0, trust_remote_code: bool = False,
            console=None) -> dict:
    from rich.console import Console

    from tuneforge.deploy.export import held_out_set
    from tuneforge.ops.merge import write_folder_atomically

    console = console or Console(quiet=True)
    target = Path(output)
    runs, recipes = check_sources(sources, method, weights, density, trust_remote_code, max_examples)
    _check_output(target, overwrite)
    if not (recipes[0].uses_lora and method != "slerp"):
        _need_mergekit(method)
    held = [held_out_set(run.path, max_examples=max_examples) for run in runs]
    missing = [str(run.path) for run, h in zip(runs, held) if h is None]
    if missing:
        raise ExportError(f"run(s) {', '.join(missing)} scored no held-out set (no eval/tuned.json samples), so the "
                          "combination cannot be compared with them", where="SOURCES",
                          fix="train with held-out data (data.eval or data.eval_fraction) and eval.baseline on")
    density = density if density is not None or method in ("linear", "slerp") else 0.5
    labels = _labels(runs, recipes)
    settings = {"sources": [str(r.path) for r in runs], "labels": labels, "method": method, "weights": weights,
                "density": density, "seed": seed}

    def write(staging: Path) -> None:
        adapters = recipes[0].uses_lora and method != "slerp"
        if adapters:
            settings["peft_combination_type"] = PEFT_TYPES[method]
            scores = _combine_adapters(runs, recipes, labels, settings, held, staging / "adapter", console)
        else:
            settings["mergekit_method"] = method
            scores = _combine_full(runs, recipes, labels, settings, held, staging, console, trust_remote_code)
        settings["scores"] = scores
        shutil.copyfile(runs[0].path / "recipe.yaml", staging / "recipe.yaml")
        (staging / "status.json").write_text(json.dumps({"state": "completed", "updated": time.time(),
                                                         "combined_from": settings["sources"]}, indent=2))
        (staging / "combine.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")

    write_folder_atomically(target, write, overwrite=overwrite)
    return {**settings, "output": str(target)}


def _need_mergekit(method: str) -> None:
    """Full models (and slerp) go through mergekit; it is in the `export` extra (mergekit 0.1.5 allows transformers
    >=5,<6, so it installs beside tuneforge's transformers)."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        raise ExportError(f"combining full models{' (slerp, also for adapter runs)' if method == 'slerp' else ''} "
                          "needs mergekit, which is not installed", where="--method",
                          fix="pip install 'mergekit>=0.1.5' (or tuneforge[export]); adapter runs combine without it "
                              "with linear / ties / dare_ties / dare_linear")


def _labels(runs, recipes) -> list[str]:
    """Column names for the sources: their recipe names, else their folder names, numbered if still not unique."""
    for names in ([r.name for r in recipes], [run.path.name for run in runs]):
        if len(set(names)) == len(names) and COMBINED not in names:
            return names
    return [f"{i + 1}:{run.path.name}" for i, run in enumerate(runs)]


def _score(model, tokenizer, held_out) -> dict:
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.evaluate.metrics import score

    answers = generate_answers(model, tokenizer, held_out.prompts, max_new_tokens=held_out.max_new_tokens)
    return score(answers, held_out.references, held_out.metrics)


def _table(labels, held, scorer) -> list[dict]:
    """One entry per source held-out set: {"held_out": label, "n": N, "scores": {model label: {metric: value}}}."""
    rows = [{"held_out": label, "n": len(h.prompts), "scores": {}} for label, h in zip(labels, held)]
    for model_label in [*labels, COMBINED]:
        for row, h in zip(rows, held):
            row["scores"][model_label] = scorer(model_label, h)
    return rows


def _combine_adapters(runs, recipes, labels, settings, held, out: Path, console) -> list[dict]:
    """All adapters on one un-quantized base, combined by add_weighted_adapter, scored via set_adapter."""
    import torch
    from peft import PeftModel

    from tuneforge.data.template import align_eos
    from tuneforge.models import check_base_is_here, load_base_model, load_tokenizer
    from tuneforge.vocab import match_vocabulary

    check_base_is_here(recipes[0].model.name, runs[0].path)
    base = load_base_model(recipes[0].model, quant=None)
    tokenizer = load_tokenizer(str(runs[0].weights_dir))
    match_vocabulary(base, tokenizer)  # runs that added tokens: the adapters' rows need the grown matrix
    names = [f"source{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(runs[0].weights_dir), adapter_name=names[0])
    for name, run in zip(names[1:], runs[1:]):
        model.load_adapter(str(run.weights_dir), adapter_name=name)
    ranks = [model.peft_config[name].r for name in names]
    torch.manual_seed(settings["seed"])  # DARE drops at random
    model.add_weighted_adapter(names, settings["weights"], COMBINED, combination_type=PEFT_TYPES[settings["method"]],
                               density=settings["density"], svd_rank=sum(ranks))
    align_eos(tokenizer, model)
    model.eval()
    console.print(f"combined {len(runs)} adapters ({settings['method']} -> PEFT {PEFT_TYPES[settings['method']]}); "
                  f"scoring on {len(runs)} held-out sets")

    def scorer(model_label, h):
        model.set_adapter(names[labels.index(model_label)] if model_label in labels else COMBINED)
        return _score(model, tokenizer, h)

    rows = _table(labels, held, scorer)
    saved = out.parent / ".adapters"
    model.save_pretrained(str(saved), selected_adapters=[COMBINED])
    shutil.move(str(saved / COMBINED), str(out))  # PEFT saves a non-default adapter in a folder of its name
    shutil.rmtree(saved, ignore_errors=True)
    tokenizer.save_pretrained(str(out))
    if (runs[0].weights_dir / "generation_config.json").is_file():
        shutil.copyfile(runs[0].weights_dir / "generation_config.json", out / "generation_config.json")
    make_portable(out, base_name=recipes[0].model.name)  # the base by its portable name, as a run's adapter/ has it
    return rows


def _combine_full(runs, recipes, labels, settings, held, staging: Path, console, trust_remote_code) -> list[dict]:
    """mergekit on full models (LoRA runs merged into full models first, for slerp)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from tuneforge.models import load_target, load_tokenizer, resolve_model_source
    from tuneforge.ops.merge import merge_run

    folders = []
    for i, run in enumerate(runs):
        if run.weights_dir.name == "model":
            folders.append(run.weights_dir)
        else:
            folders.append(merge_run(str(run.path), str(staging / f".source{i}"), trust_remote_code=trust_remote_code))
    weights, method = settings["weights"], settings["method"]
    config = {"merge_method": method, "dtype": "float32"}
    if method == "slerp":
        config.update(base_model=str(folders[0]), models=[{"model": str(f)} for f in folders],
                      parameters={"t": weights[1] / sum(weights)})
    else:
        extra = {} if method == "linear" else {"density": settings["density"]}
        config["models"] = [{"model": str(f), "parameters": {"weight": w, **extra}} for f, w in zip(folders, weights)]
        if method != "linear":
            config["base_model"] = resolve_model_source(recipes[0].model.name)
    out = staging / "model"
    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, random_seed=settings["seed"],
                                   trust_remote_code=trust_remote_code))
    for stale in staging.glob(".source*"):
        shutil.rmtree(stale, ignore_errors=True)
    load_tokenizer(str(runs[0].weights_dir)).save_pretrained(str(out))  # the run's tokenizer and chat template
    if (runs[0].weights_dir / "generation_config.json").is_file():
        shutil.copyfile(runs[0].weights_dir / "generation_config.json", out / "generation_config.json")
    make_portable(out)
    console.print(f"combined {len(runs)} models with mergekit ({method}); scoring on {len(runs)} held-out sets")
    cache: dict = {}

    def scorer(model_label, h):
        if cache.get("label") != model_label:  # one model in memory at a time
            cache.clear()
            path = str(out) if model_label == COMBINED else str(runs[labels.index(model_label)].path)
            model, tokenizer = load_target(path, trust_remote_code=trust_remote_code)
            cache.update(label=model_label, model=model, tokenizer=tokenizer)
        return _score(cache["model"], cache["tokenizer"], h)

    return _table(labels, held, scorer)


def results_table(result: dict):
    from rich.markup import escape
    from rich.table import Table

    labels = result["labels"]
    table = Table(title=f"combine {result['method']} (weights {result['weights']}): held-out scores")
    for column in ("held-out set", "metric", *labels, COMBINED):
        table.add_column(escape(column), justify="left" if column in ("held-out set", "metric") else "right")
    for row in result["scores"]:
        for metric in row["scores"][COMBINED]:
            table.add_row(escape(f"{row['held_out']} (n={row['n']})"), escape(metric),
                          *(f"{row['scores'][label][metric]:.1f}" for label in [*labels, COMBINED]))
    return table
