"""`tuneforge export`: a finished run (or a model) -> a GGUF file, an Ollama folder, or a bitsandbytes checkpoint.

Every path starts from an ordinary checkpoint folder: a LoRA/QLoRA run is merged first (ops/merge.py, into the
un-quantized base), a full run's model/ is used as it is, a model folder / embedded model / GGUF file is resolved as
`train` resolves it. Everything is built in a hidden work folder beside --output and moved into place at the end, so
an interrupted export leaves no half-written output.

  gguf       llama.cpp's converter to f16, then llama.cpp's quantizer for q8_0 / q4_k_m (gguf_convert.py); the file
             carries the training chat template and stop tokens. From a run, a quantized export is scored against
             the f16 file on the run's held-out set (gguf_runtime.py).
  ollama     that GGUF plus a Modelfile whose TEMPLATE renders the training prompt (ollama.py).
  bnb-4bit   the merged model loaded through bitsandbytes (nf4/fp4, double quant) and saved as safetensors with its
  bnb-8bit   quantization config (transformers loads it back as it is).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneforge.deploy.gguf_convert import ExportError
from tuneforge.errors import RunDirError

QUANTS = {"gguf": ("f16", "q8_0", "q4_k_m"), "ollama": ("f16", "q8_0", "q4_k_m"), "bnb-4bit": ("nf4", "fp4"),
          "bnb-8bit": ("int8",)}  # the first is each format's default
OLLAMA_FILES = ("Modelfile", "model.gguf", "export.json")


# Why GPTQ / AWQ are not export formats (checked 2026-12-07 against the package index; bench/quantize_gpu.py holds
# the details and runs them on a GPU machine where the pins below are met).
GPTQ_AWQ_WHY = (
    "{fmt} export is not built in: the maintained libraries cannot be installed beside tuneforge. llm-compressor "
    "(GPTQ and AWQ; pure-Python wheels) 0.14.0.1 requires transformers>=5.15,<=5.17 and compressed-tensors==0.19.0, "
    "while tuneforge requires transformers>=5.20; gptqmodel 7.7.0 is published only as a source distribution that "
    "compiles CUDA kernels at install. Both calibrate on a CUDA GPU")
GPTQ_AWQ_FIX = ("for 4-bit serving now use --format bnb-4bit (transformers) or --format gguf --quant q4_k_m "
                "(llama.cpp); for GPTQ/AWQ run bench/quantize_gpu.py on a GPU machine with transformers 5.15-5.17 "
                "(its docstring lists the wheels)")


def check_options(fmt: str, quant: str | None) -> str:
    """The quantization to use for `fmt` (its default when None); ExportError for an unknown format or a quant that
    format does not take."""
    if fmt.lower() in ("gptq", "awq"):
        raise ExportError(GPTQ_AWQ_WHY.format(fmt=fmt), where="--format", fix=GPTQ_AWQ_FIX)
    if fmt not in QUANTS:
        raise ExportError(f"unknown export format {fmt!r}", where="--format", fix=f"use one of: {', '.join(QUANTS)}")
    if quant is None:
        return QUANTS[fmt][0]
    if quant not in QUANTS[fmt]:
        raise ExportError(f"--quant {quant} is not valid for --format {fmt}", where="--quant",
                          fix=f"for {fmt} use one of: {', '.join(QUANTS[fmt])}")
    return quant


@dataclass
class HeldOut:
    """A run's held-out set as the run scored it after training: rendered prompts, references, metrics."""

    prompts: list[str]
    references: list[str]
    metrics: list
    max_new_tokens: int
    source: str


def held_out_set(run_path: Path, *, max_examples: int | None = None) -> HeldOut | None:
    """The prompts and references of the run's eval/tuned.json (what it scored itself, with the chat template
    already applied), its eval.metrics and eval.max_new_tokens. None when the run scored no held-out set."""
    from tuneforge.evaluate.metrics import resolve_metrics
    from tuneforge.recipe import load_recipe

    tuned = run_path / "eval" / "tuned.json"
    if not tuned.is_file():
        return None
    samples = json.loads(tuned.read_text(encoding="utf-8")).get("samples") or []
    samples = [s for s in samples if isinstance(s.get("prompt"), str)][: max_examples or None]
    if not samples:
        return None
    recipe = load_recipe(run_path / "recipe.yaml")
    metrics = resolve_metrics(recipe.eval.metrics, base_dir=recipe.source_dir)
    return HeldOut([s["prompt"] for s in samples], [s["reference"] for s in samples], metrics,
                   recipe.eval.max_new_tokens, f"{run_path}/eval/tuned.json")


def open_source(source: str, work: Path, *, trust_remote_code: bool = False, base: str | None = None):
    """(checkpoint folder, run or None) for a run directory, a model folder, a GGUF file, the embedded model or a
    hub id. A LoRA/QLoRA run is merged into `work` (on `base`, the base's location now if it moved); a run that did
    not complete is refused (RunDirError)."""
    from tuneforge.models import load_target, open_text_run, resolve_model_source

    path = Path(source)
    if (path / "recipe.yaml").exists():
        run, _ = open_text_run(path, "tuneforge export", trust_remote_code=trust_remote_code)
        if run.weights_dir.name == "model":  # full fine-tuning (or a combine that produced a full model)
            return run.weights_dir, run
        from tuneforge.ops.merge import merge_run

        return merge_run(str(path), str(work / "merged"), base=base, trust_remote_code=trust_remote_code), run
    folder = Path(resolve_model_source(source))
    if folder.is_dir():
        return folder, None
    model, tokenizer = load_target(source, device="cpu", trust_remote_code=trust_remote_code)  # a hub id
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return work / "model", None


def tokenizer_and_stops(folder: Path):
    """The folder's tokenizer (with its chat template) and the token ids generation stops at."""
    from transformers import AutoConfig, GenerationConfig

    from tuneforge.deploy.gguf_convert import training_stops
    from tuneforge.models import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(folder))
    else:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder)))
    return tokenizer, generation, training_stops(tokenizer, generation)


def check_output(target: Path, fmt: str, *, overwrite: bool) -> None:
    """Refuse an --output export may not write: a link; for gguf, a folder or a non-.gguf name, an existing file
    without --overwrite or one that is not a GGUF file; for the folder formats, what merge refuses (a non-empty
    folder without --overwrite, a run directory, foreign files), with an Ollama folder's own files allowed."""
    from tuneforge.ops.merge import check_merge_target
    from tuneforge.run import RUN_MARKER, refuse_if_in_use

    refuse_if_in_use(target, "export into it")
    if target.is_symlink():
        raise RunDirError(f"--output {target} is a symbolic link; export does not write through links",
                          fix="pass the real path, or a new --output")
    if fmt == "gguf":
        if target.suffix != ".gguf":
            raise ExportError(f"--output {target} should be a file name ending in .gguf", where="--output",
                              fix=f"e.g. --output {target.with_suffix('.gguf').name}")
        if target.is_dir():
            raise RunDirError(f"--output {target} is a folder", fix="give a file name ending in .gguf")
        if target.exists():
            if not overwrite:
                raise RunDirError(f"{target} already exists", fix="pass --overwrite or choose another --output")
            with open(target, "rb") as handle:
                if handle.read(4) != b"GGUF":
                    raise RunDirError(f"{target} is not a GGUF file; --overwrite replaces only GGUF files",
                                      fix="choose another --output")
        return
    if fmt.startswith("bnb-"):
        check_merge_target(target, overwrite=overwrite)
        return
    if target.exists() and not target.is_dir():
        raise RunDirError(f"--output {target} is a file; --format ollama writes a folder", fix="choose another --output")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise RunDirError(f"{target} already exists", fix="pass --overwrite or choose another --output")
    foreign = [e.name for e in sorted(target.iterdir()) if e.name not in OLLAMA_FILES or not e.is_file()]
    if (target / RUN_MARKER).exists() or foreign:
        raise RunDirError(f"{target} holds files that are not an Ollama export ({', '.join(foreign[:8])}); "
                          "--overwrite refuses to delete them", fix="choose another --output")


def export(source: str, fmt: str, quant: str | None, output: str, *, overwrite: bool = False,
           trust_remote_code: bool = False, score: bool = True, max_examples: int | None = None,
           base: str | None = None, console=None) -> dict:
    """Export `source` as `fmt`; returns a summary (files, sizes, stop tokens, and held-out scores when measured)."""
    from rich.console import Console

    console = console or Console(quiet=True)
    quant = check_options(fmt, quant)
    if max_examples is not None and max_examples < 1:
        raise ExportError(f"--max-examples {max_examples}: give at least 1 (or leave it out for every example)",
                          where="--max-examples")
    target = Path(output)
    check_output(target, fmt, overwrite=overwrite)
    if fmt in ("gguf", "ollama"):
        from tuneforge.deploy.gguf_convert import converter_script

        converter_script(console)  # the tools are there (fetched on first use), before any merge
    if (Path(source) / "recipe.yaml").exists():  # a run that cannot be exported: refused before any folder is made
        from tuneforge.models import open_text_run

        open_text_run(source, "tuneforge export", trust_remote_code=trust_remote_code)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        folder, run = open_source(source, work, trust_remote_code=trust_remote_code, base=base)
        tokenizer, generation, stops = tokenizer_and_stops(folder)
        summary = {"source": source, "format": fmt, "quant": quant, "output": str(target), "stop_token_ids": stops,
                   "stop_tokens": tokenizer.convert_ids_to_tokens(stops)}
        if fmt == "ollama":
            from tuneforge.deploy.ollama import ollama_template

            ollama_template(tokenizer)  # a template Ollama cannot be given is refused before the conversion
        if fmt.startswith("bnb-"):
            _export_bnb(folder, target, fmt, quant, tokenizer, generation, overwrite=overwrite)
        else:
            _export_gguf(folder, work, target, fmt, quant, tokenizer, stops, summary, overwrite=overwrite,
                         held_out=held_out_set(run.path, max_examples=max_examples) if run is not None and score else None,
                         console=console)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _export_gguf(folder, work, target, fmt, quant, tokenizer, stops, summary, *, overwrite, held_out, console):
    from tuneforge.deploy.gguf_convert import (check_gguf_metadata, convert_to_gguf, copy_into, file_size,
                                               quantize_gguf, set_template_and_stops)

    console.print(f"converting {folder} with llama.cpp's convert_hf_to_gguf.py (f16)", markup=False)
    f16 = convert_to_gguf(folder, work / "model-f16.gguf")
    set_template_and_stops(f16, tokenizer, stops)
    check_gguf_metadata(f16, tokenizer, stops)
    final = f16
    if quant != "f16":
        console.print(f"quantizing to {quant} with llama.cpp's quantizer", markup=False)
        final = quantize_gguf(f16, work / f"model-{quant}.gguf", quant)
        check_gguf_metadata(final, tokenizer, stops)
        if held_out is not None:
            from rich.progress import Progress

            from tuneforge.deploy.gguf_runtime import score_gguf_files, scores_table

            with Progress(console=console, transient=True) as progress:
                result = score_gguf_files({"f16": f16, quant: final}, held_out, progress=progress)
            console.print(scores_table(result))
            summary["scores"] = {k: v for k, v in result.items() if k != "samples"}
        else:
            console.print("not scored against f16 (--no-score, or not a run with a scored held-out set)")
    summary["size_bytes"] = final.stat().st_size
    summary["size"] = file_size(final)
    if fmt == "gguf":
        copy_into(final, target)
        summary["files"] = [str(target)]
        return
    from tuneforge.deploy.gguf_convert import read_metadata
    from tuneforge.deploy.ollama import modelfile_text, ollama_template
    from tuneforge.ops.merge import write_folder_atomically

    adds_bos = bool(read_metadata(final, ("tokenizer.ggml.add_bos_token",)).get("tokenizer.ggml.add_bos_token"))
    template, system = ollama_template(tokenizer, bos_added_by_runtime=adds_bos)
    modelfile = modelfile_text("model.gguf", template, system, tokenizer.convert_ids_to_tokens(stops))

    def write(staging: Path) -> None:
        copy_into(final, staging / "model.gguf")
        (staging / "Modelfile").write_text(modelfile, encoding="utf-8")
        (staging / "export.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

    write_folder_atomically(target, write, overwrite=overwrite)
    summary["files"] = [str(target / name) for name in OLLAMA_FILES]


def _export_bnb(folder, target, fmt, quant, tokenizer, generation, *, overwrite) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge.artifacts import make_portable
    from tuneforge.models import pick_device, quiet_transformers, resolve_dtype
    from tuneforge.ops.merge import MERGED_MARKER, write_folder_atomically

    quiet_transformers()
    device = pick_device()
    compute = resolve_dtype("auto", device)
    if fmt == "bnb-4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype=compute,
                                                 device_map={"": 0 if device == "cuda" else "cpu"})
    model.generation_config = generation

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        make_portable(staging)
        (staging / MERGED_MARKER).write_text(f"{fmt} ({quant}) export of {folder}\n", encoding="utf-8")

    write_folder_atomically(target, write, overwrite=overwrite)
