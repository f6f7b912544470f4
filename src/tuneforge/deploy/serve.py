"""`tuneforge serve`: what is served (one base, many LoRA adapters on it), how it is loaded, and the equivalent vLLM
command.

A plan is made first, without loading weights (names, folders, ranks, the checks a user can fail): `--print-vllm`
needs only the plan. `load_served` then loads the base ONCE and puts every adapter on it with PEFT's multi-adapter
`load_adapter(path, adapter_name=...)`; requests pick an adapter per row (serve_batch.py). Each served name keeps its
own tokenizer, chat template and generation config (stop tokens) from the folder it was saved in, loaded the way
`tuneforge generate` loads a run (models.load_target), so greedy answers match.

The HTTP side is serve_api.py, the batching loop serve_batch.py.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import TuneforgeError

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch (peft/tuners/lora/layer.py)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
NAME = re.compile(r"^\S{1,128}$")  # a served name: what clients send as `model`


class ServeError(TuneforgeError):
    """`tuneforge serve` cannot start as asked: a bad --adapter, a host it will not bind, an adapter for another
    base."""


@dataclass
class AdapterPlan:
    name: str  # what clients send as `model`
    folder: Path  # the adapter folder (a run's adapter/, or a PEFT adapter folder)
    rank: int  # the largest LoRA rank in its config (r and rank_pattern)
    dora: bool  # DoRA adapters cannot share a mixed batch (PEFT refuses); they get batches of their own
    run: Path | None = None  # the run directory it came from, if any


@dataclass
class ServePlan:
    base_name: str  # the base's served name
    base_section: object  # a recipe ModelSection for models.load_base_model
    base_weights: Path | None  # a full fine-tuning run's model/ folder (tokenizer + generation config from it)
    quant: object | None  # a QLoRA run as BASE: its 4-bit base, as `tuneforge generate` loads it
    adapters: list[AdapterPlan] = field(default_factory=list)
    base_run: Path | None = None  # BASE was a LoRA run directory: its adapter is adapters[0]

    @property
    def names(self) -> list[str]:
        return [self.base_name] + [a.name for a in self.adapters]


def parse_adapter_options(options: list[str]) -> list[tuple[str, str]]:
    """--adapter NAME=RUN (repeatable) -> [(name, path)]."""
    pairs = []
    for option in options:
        name, sep, path = option.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ServeError(f"--adapter {option!r}: expected NAME=RUN_DIR", where="--adapter",
                             fix="e.g. --adapter support=runs/support-lora")
        pairs.append((name, path))
    return pairs


def plan_serving(base: str, adapters: list[tuple[str, str]], *, trust_remote_code: bool = False) -> ServePlan:
    """What `serve BASE --adapter NAME=RUN ...` will serve, checked without loading weights."""
    from tuneforge.models import open_text_run
    from tuneforge.recipe import ModelSection

    plan = None
    if (Path(base) / "recipe.yaml").exists():
        run, recipe = open_text_run(base, "tuneforge serve", trust_remote_code=trust_remote_code)
        section = recipe.model.model_copy(update={"trust_remote_code": trust_remote_code})
        if run.weights_dir.name == "model":  # full fine-tuning: the run's model is the base
            plan = ServePlan(run.path.name, section.model_copy(update={"name": str(run.weights_dir)}),
                             run.weights_dir, None)
        else:  # LoRA/QLoRA: its base is served, and the run's adapter on it under the run folder's name
            quant = recipe.quant if recipe.adapter.type == "qlora" else None
            plan = ServePlan(recipe.model.name, section, None, quant, base_run=run.path)
            plan.adapters += _run_adapters(run.path.name, run.path, plan, trust_remote_code)
    if plan is None:
        if Path(base).is_dir() and (Path(base) / "adapter_config.json").exists():
            raise ServeError(f"{base} is an adapter folder, not a model", where="BASE",
                             fix="serve its base model and pass the adapter with --adapter NAME=FOLDER")
        plan = ServePlan(base, ModelSection(name=base, trust_remote_code=trust_remote_code), None, None)
    for name, path in adapters:
        plan.adapters += _run_adapters(name, Path(path), plan, trust_remote_code)
    _check_names(plan)
    return plan


def _run_adapters(name: str, path: Path, plan: ServePlan, trust_remote_code: bool) -> list[AdapterPlan]:
    """A per-tenant run (federated.mode: per_tenant) holds one adapter per tenant, listed in its summary.json
    ("adapters": [{name, path}]): each is served as NAME/TENANT. Any other run or folder is one adapter, NAME."""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if (path / "recipe.yaml").exists() and isinstance(summary, dict) and summary.get("mode") == "per_tenant":
        return [_adapter_plan(f"{name}/{a['name']}", path, plan, trust_remote_code, sub=a["path"])
                for a in summary.get("adapters") or []]
    return [_adapter_plan(name, path, plan, trust_remote_code)]


def _adapter_plan(name: str, path: Path, plan: ServePlan, trust_remote_code: bool,
                  sub: str | None = None) -> AdapterPlan:
    """One adapter: a finished LoRA/QLoRA run directory (its adapter/ folder, or `sub`: one of a per-tenant run's
    adapter folders), or a PEFT adapter folder."""
    from tuneforge.models import open_text_run

    where = f"--adapter {name}={path}"
    run_path = None
    if (path / "recipe.yaml").exists():
        run, recipe = open_text_run(path, "tuneforge serve", trust_remote_code=trust_remote_code)
        if run.weights_dir.name != "adapter":
            raise ServeError(f"{path} is a full fine-tuning run; it has no adapter to put on a base", where=where,
                             fix=f"serve it as the base: tuneforge serve {path}")
        if not _same_model(recipe.model.name, plan.base_section.name):
            raise ServeError(f"the run {path} was trained on {recipe.model.name}, not on the served base "
                             f"{plan.base_section.name}; its adapter would give wrong answers there", where=where,
                             fix=f"serve its base: tuneforge serve {recipe.model.name} --adapter {name}={path}")
        folder, run_path = (run.path / sub if sub else run.weights_dir), run.path
    elif (path / "adapter_config.json").is_file():
        folder = path
    else:
        what = "does not exist" if not path.exists() else "is neither a run directory nor a PEFT adapter folder"
        raise ServeError(f"{path} {what}", where=where,
                         fix="pass a finished LoRA run directory (or a folder with adapter_config.json)")
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ServeError(f"{folder / 'adapter_config.json'} cannot be read ({exc})", where=where,
                         fix="train the run again, or restore the adapter folder") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ServeError(f"{folder} is a {config.get('peft_type')} adapter; serve batches LoRA adapters only",
                         where=where, fix="merge it (tuneforge merge) and serve the merged model as BASE")
    ranks = [int(config.get("r") or 8), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return AdapterPlan(name, folder, max(ranks), bool(config.get("use_dora")), run_path)


def _same_model(a: str, b: str) -> bool:
    """Two model names point at the same model: equal names, or the same local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _check_names(plan: ServePlan) -> None:
    seen = set()
    for name in plan.names:
        if name in seen:
            raise ServeError(f"the served name {name!r} is used twice", where="--adapter",
                             fix="give each --adapter a NAME of its own (and not the base's name)")
        seen.add(name)
    for adapter in plan.adapters:
        if not NAME.match(adapter.name):
            raise ServeError(f"adapter name {adapter.name!r}: no spaces, at most 128 characters", where="--adapter",
                             fix="e.g. --adapter support-v2=RUN_DIR (a run directory as BASE: rename its folder)")


def check_host(host: str, allow_remote: bool) -> None:
    """Bind only to loopback unless --allow-remote: the server has no authentication beyond an optional --api-key."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ServeError(f"--host {host} is not a loopback address; anyone who can reach it could use the model",
                         where="--host", fix="keep --host 127.0.0.1, or pass --allow-remote (and --api-key) on "
                         "purpose")


def vllm_command(plan: ServePlan, *, host: str, port: int, max_model_len: int | None, dtype: str | None = None) -> str:
    """The `vllm serve` command that serves the same base and adapters."""
    from tuneforge.models import resolve_model_source

    base = str(plan.base_weights) if plan.base_weights else resolve_model_source(plan.base_section.name)
    parts = ["vllm", "serve", base] + (["--served-model-name", plan.base_name] if plan.base_name != base else [])
    parts += ["--host", host, "--port", str(port)]
    if max_model_len:
        parts += ["--max-model-len", str(max_model_len)]
    if dtype:  # vLLM's --dtype takes the same names (auto, float32, bfloat16, float16)
        parts += ["--dtype", dtype]
    if plan.quant is not None:
        parts += ["--quantization", "bitsandbytes"]
    if plan.adapters:
        rank = max(a.rank for a in plan.adapters)
        parts += ["--enable-lora", "--max-loras", str(len(plan.adapters)),
                  "--max-lora-rank", str(next((r for r in VLLM_LORA_RANKS if r >= rank), rank)),
                  "--lora-modules", *(f"{a.name}={a.folder}" for a in plan.adapters)]
        template = plan.adapters[0].folder / "chat_template.jinja"
        if plan.base_run is not None and template.exists():
            # vLLM has one chat template per server; serving a run, it is the run's own (as tuneforge generate's)
            parts += ["--chat-template", str(template)]
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class Served:
    """One name clients can ask for."""
    name: str
    adapter: str  # the PEFT adapter name inside the model, or BASE_ROW
    tokenizer: object
    generation_config: object  # eos ids in force (align_eos), pad id, and the run's saved defaults
    dora: bool = False

    @property
    def batch_key(self) -> tuple:
        """Rows can share one generate() call when their tokenizers and generation configs agree (a DoRA adapter:
        only with itself)."""
        special = tuple(sorted(self.tokenizer.all_special_ids))
        return (len(self.tokenizer), special, self.generation_config.to_json_string(),
                self.adapter if self.dora else None)


@dataclass
class ServedModels:
    model: object  # the base, a PeftModel once adapters are loaded on it
    entries: dict[str, Served]
    base_name: str
    context: int  # the model's context (positions) in tokens
    max_model_len: int  # prompt + completion limit per request (<= context)
    plan: ServePlan
    limit_source: str = "the model's context"  # what set max_model_len, for error messages
    loaded_config: object = None  # the base's generation config as loaded (an adapter without its own starts here)
    next_adapter: int = 0  # PEFT adapter names are adapter_0, adapter_1, ... never reused


def load_served(plan: ServePlan, *, device: str | None = None, max_model_len: int | None = None,
                dtype: str | None = None) -> ServedModels:
    """Load the base once and every adapter onto it. Mirrors models.load_target for each name (`dtype` as there)."""
    from tuneforge.evaluate.generation import context_limit
    from tuneforge.models import check_dtype_option, load_base_model, load_tokenizer

    check_dtype_option(dtype)
    tokenizer_source = str(plan.base_weights) if plan.base_weights else plan.base_section.name
    section = plan.base_section.model_copy(update={"dtype": dtype}) if dtype else plan.base_section
    model = load_base_model(section, quant=plan.quant, device=device)
    base_tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=plan.base_section.trust_remote_code)
    loaded_config = copy.deepcopy(model.generation_config)  # as loaded, before any tokenizer's stop token joins it
    entries = {plan.base_name: _served(plan.base_name, BASE_ROW, base_tokenizer,
                                       _generation_config(plan.base_weights, loaded_config))}
    served = ServedModels(model, entries, plan.base_name, 0, 0, plan, loaded_config=loaded_config)
    for adapter in plan.adapters:
        _attach(served, adapter)
    model = served.model
    model.eval()
    context = context_limit(model, base_tokenizer, 0)
    if context is None and max_model_len is None:
        raise ServeError("the model's context length is unknown (no max_position_embeddings in its config)",
                         where="--max-model-len", fix="pass --max-model-len N")
    if max_model_len is not None and context is not None and max_model_len > context:
        raise ServeError(f"--max-model-len {max_model_len} is longer than the model's context ({context} tokens)",
                         where="--max-model-len", fix=f"pass at most {context}")
    served.context, served.max_model_len = context or max_model_len, max_model_len or context
    served.limit_source = "--max-model-len" if max_model_len is not None else "the model's context"
    return served


def _attach(served: ServedModels, adapter: AdapterPlan) -> Served:
    """Put one adapter on the served base and make its name servable (its own tokenizer and generation config)."""
    from tuneforge.models import check_weight_files, load_tokenizer

    check_weight_files(adapter.folder, where=f"--adapter {adapter.name}")
    internal = f"adapter_{served.next_adapter}"  # PEFT names must be module-safe; clients use adapter.name
    served.next_adapter += 1
    served.model = _put_adapter(served.model, adapter, internal)
    served.model.eval()
    has_tokenizer = (adapter.folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter.folder)) if has_tokenizer else served.entries[served.base_name].tokenizer
    entry = _served(adapter.name, internal, tokenizer, _generation_config(adapter.folder, served.loaded_config),
                    dora=adapter.dora)
    served.entries[adapter.name] = entry
    return entry


def add_adapter(served: ServedModels, name: str, path: str) -> Served:
    """Hot-load one more adapter onto the running base (POST /v1/load_lora_adapter; on the worker thread)."""
    if name in served.entries:
        raise ServeError(f"the served name {name!r} is already in use", where="lora_name",
                         fix="unload it first (POST /v1/unload_lora_adapter), or choose another name")
    adapter = _adapter_plan(name, Path(path), served.plan, served.plan.base_section.trust_remote_code)
    served.plan.adapters.append(adapter)
    _check_names(served.plan)
    try:
        return _attach(served, adapter)
    except BaseException:
        served.plan.adapters.remove(adapter)
        raise


def remove_adapter(served: ServedModels, name: str) -> None:
    """Take an adapter off the base (POST /v1/unload_lora_adapter; on the worker thread)."""
    entry = served.entries.get(name)
    if entry is None or name == served.base_name:
        what = "is the base model" if entry is not None else "is not served"
        raise ServeError(f"{name!r} {what}; only adapters can be unloaded", where="lora_name",
                         fix=f"one of: {', '.join(n for n in served.entries if n != served.base_name) or '(none)'}")
    del served.entries[name]
    served.plan.adapters = [a for a in served.plan.adapters if a.name != name]
    if served.plan.adapters:
        served.model.delete_adapter(entry.adapter)
    else:  # the last one: back to the plain base
        served.model = served.model.unload()


def _put_adapter(model, adapter: AdapterPlan, internal: str):
    """The adapter onto the one base: PeftModel around it for the first, load_adapter for the others."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter.folder), adapter_name=internal)
            return model
        return PeftModel.from_pretrained(model, str(adapter.folder), adapter_name=internal)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:  # shape mismatch: another base; a broken folder
        if isinstance(model, PeftModel) and internal in model.peft_config:
            model.delete_adapter(internal)  # what load_adapter put in before it failed
        raise ServeError(f"adapter {adapter.name} ({adapter.folder}) does not load onto this base: "
                         f"{str(exc).splitlines()[0][:300]}", where=f"--adapter {adapter.name}",
                         fix="serve the base model the adapter was trained on") from None


def _generation_config(folder: Path | None, fallback):
    """The generation config saved in `folder` (a run's adapter/ or model/), else a copy of `fallback`."""
    from transformers import GenerationConfig

    if folder is not None and (Path(folder) / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(str(folder))
    return copy.deepcopy(fallback)


def _served(name: str, adapter: str, tokenizer, generation_config, dora: bool = False) -> Served:
    """Stop tokens as `tuneforge generate` has them: the chat template's end-of-turn token joins the EOS list."""
    from types import SimpleNamespace

    from tuneforge.data.template import align_eos

    align_eos(tokenizer, SimpleNamespace(generation_config=generation_config))
    return Served(name, adapter, tokenizer, generation_config, dora)
