"""An ordinary checkpoint folder -> a GGUF file, with llama.cpp's own tools only.

Which llama.cpp, in one place: pyproject.toml's `export` extra pins `llama-cpp-python` (llama.cpp's quantizer and
runtime, compiled from its sdist). Everything else is looked up from the installed version, never pinned twice:
- Conversion: llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and the `gguf-py` it was written
  against). No wheel ships it; the `llama-cpp-python` sdist vendors llama.cpp, so `fetch_converter` downloads the
  sdist of the INSTALLED llama-cpp-python version from the package index (`pip download`) and extracts those parts
  into `<cache>/llama.cpp/<version>/` (scripts/setup.sh test and scripts/llama_cpp_tools.sh do it at set-up; an
  export does it on first use). Converter, quantizer and the runtime that later loads the file are then one
  llama.cpp commit, so a llama.cpp release cannot pair a new converter with an old runtime (or the reverse): moving
  to a new llama.cpp is one edit of the pin, and the tests in tests/test_export.py say whether it still holds.
- Metadata: the converter takes the chat template and EOS from the folder's tokenizer files. Where they differ from
  what the run trained with (the template in the saved tokenizer, the end-of-turn token the template puts after an
  answer), gguf-py's own `gguf_new_metadata.py` rewrites them; `check_gguf_metadata` verifies the result.
- Quantization: llama.cpp's quantizer through `llama_cpp.llama_model_quantize`, from the f16 file.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tuneforge.errors import ModelError, TuneforgeError

PACKAGE = "llama-cpp-python"
# The parts of the sdist's vendor/llama.cpp/ the converter needs (and llama.cpp's licence, which travels with them).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
GGUF_QUANTS = {"f16": None, "q8_0": 7, "q4_k_m": 15}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M
SETUP_FIX = "bash scripts/llama_cpp_tools.sh (installs llama-cpp-python and extracts llama.cpp's converter)"


class ExportError(TuneforgeError):
    """An export or combine cannot be done as asked (bad option, missing tool, output in the way)."""


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        raise ExportError("GGUF export needs llama-cpp-python (llama.cpp's quantizer and runtime), which is not "
                          "installed", where="--format", fix=SETUP_FIX) from None


def converter_dir(version: str | None = None) -> Path:
    from tuneforge.models import cache_dir

    return cache_dir() / "llama.cpp" / (version or llama_cpp_version())


def _converter_complete(folder: Path) -> bool:
    return ((folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion" / "__init__.py").is_file()
            and (folder / "gguf-py" / "gguf" / "__init__.py").is_file())


def converter_script(console=None) -> Path:
    """convert_hf_to_gguf.py of the installed llama-cpp-python's llama.cpp (fetched from the package index on first
    use), or ExportError saying how to get it."""
    folder = converter_dir()
    script = folder / "convert_hf_to_gguf.py"
    if not _converter_complete(folder):
        if console is not None:
            console.print(f"fetching llama.cpp's converter: the {PACKAGE}=={folder.name} sdist (pip download), "
                          f"once, into {folder}", markup=False)
        fetch_converter(folder.name)
        if not _converter_complete(folder):
            raise ExportError(f"llama.cpp's converter is not complete in {folder}", where="--format",
                              fix=f"delete {folder} and run {SETUP_FIX}")
    try:
        import sentencepiece  # noqa: F401  (the converter imports it for every Llama-family model)
    except ImportError:
        raise ExportError("llama.cpp's converter needs the sentencepiece package", fix="pip install sentencepiece") from None
    return script


def fetch_converter(version: str | None = None) -> Path:
    """Download the llama-cpp-python sdist of `version` (default: the installed one) with pip and extract the
    converter into the cache. Idempotent; the folder appears whole (extracted beside it, then renamed)."""
    version = version or llama_cpp_version()
    target = converter_dir(version)
    if _converter_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an incomplete folder (interrupted by hand, edited): fetched again
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                               ":all:", f"{PACKAGE}=={version}", "-d", work], capture_output=True, text=True)
        sdist = next(Path(work).glob("llama_cpp_python-*.tar.gz"), None)
        if proc.returncode != 0 or sdist is None:
            raise ExportError(f"pip could not download the {PACKAGE}=={version} sdist (which carries llama.cpp's "
                              f"converter): {(proc.stderr or proc.stdout).strip()[-300:]}", where="--format",
                              fix="check the network / package index, then run scripts/llama_cpp_tools.sh again")
        prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
        staging = Path(work) / "converter"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inner = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if inner.split("/")[0] in CONVERTER_PARTS and (member.isfile() or member.isdir()):
                    member.name = inner
                    archive.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py",
                              fix="pin a llama-cpp-python version whose sdist vendors llama.cpp")
        try:
            os.replace(staging, target)
        except OSError:  # another process put it there meanwhile
            if not _converter_complete(target):
                raise
    return target


def convert_to_gguf(model_dir: Path, out_file: Path, *, outtype: str = "f16") -> Path:
    """Run llama.cpp's converter on a checkpoint folder. Its own gguf-py is used (it puts it on sys.path itself)."""
    script = converter_script()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile",
                           str(out_file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_file.is_file():
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        tail = "\n    ".join(lines[-6:])
        raise ModelError(f"llama.cpp's converter could not convert {model_dir}:\n    {tail}", where=str(model_dir),
                         fix="llama.cpp may not support this architecture (python convert_hf_to_gguf.py "
                             "--print-supported-models lists those it does); export --format bnb-4bit works for any")
    return out_file


def quantize_gguf(f16_file: Path, out_file: Path, quant: str, *, threads: int | None = None) -> Path:
    """llama.cpp's quantizer: f16 GGUF -> q8_0 / q4_k_m GGUF (metadata, template and EOS included, are copied).
    Tensors whose rows do not fit the k-quant block (256) get llama.cpp's own fallback type."""
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its per-tensor log lines, unless they are errors
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_QUANTS[quant]
    params.nthread = threads or min(4, os.cpu_count() or 1)
    code = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), params)
    if code != 0 or not out_file.is_file():
        raise ExportError(f"llama.cpp's quantizer failed on {f16_file} (code {code})", where="--quant",
                          fix="try --quant q8_0 or f16")
    return out_file


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)  # parses every array element up front: seconds for a 49k-token vocabulary, so kept


def gguf_reader(gguf_file: Path):
    """The gguf package's reader of this file (one per file version)."""
    stat = Path(gguf_file).stat()
    return _reader(str(Path(gguf_file).resolve()), stat.st_size, stat.st_mtime_ns)


def read_metadata(gguf_file: Path, keys: tuple[str, ...] | None = None) -> dict:
    """GGUF key/values (token lists left out unless asked for by name) read with the gguf package."""
    reader = gguf_reader(gguf_file)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return {key: field.contents() for key, field in reader.fields.items()
            if (key in keys if keys else key not in skip)}


def training_stops(tokenizer, generation_config) -> list[int]:
    """The token ids generation stops at, as the run trained and scored (align_eos's list), the template's
    end-of-turn token first: it becomes the GGUF's eos."""
    from types import SimpleNamespace

    from tuneforge.data.template import align_eos, end_of_turn_token_id

    stops = align_eos(tokenizer, SimpleNamespace(generation_config=generation_config))
    end = end_of_turn_token_id(tokenizer)
    return [end] + [s for s in stops if s != end] if end in stops else stops


def set_template_and_stops(gguf_file: Path, tokenizer, stops: list[int]) -> None:
    """Make the GGUF carry exactly the tokenizer's chat template and, as eos (and eot, for a second id), the ids
    generation stops at. Rewritten with gguf-py's gguf_new_metadata.py only where the converter's choice differs."""
    meta = read_metadata(gguf_file, ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"))
    template = tokenizer.chat_template or None
    args: list[str] = []
    if template and meta.get("tokenizer.chat_template") != template:
        path = gguf_file.with_suffix(".chat_template.jinja")
        path.write_text(template, encoding="utf-8")
        args += ["--chat-template-file", str(path)]
    if stops and meta.get("tokenizer.ggml.eos_token_id") != stops[0]:
        args += ["--special-token-by-id", "eos", str(stops[0])]
    if len(stops) > 1 and meta.get("tokenizer.ggml.eot_token_id") not in stops[1:]:
        args += ["--special-token-by-id", "eot", str(stops[1])]
    if not args:
        return
    script = converter_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    rewritten = gguf_file.with_suffix(".meta.gguf")
    env = {**os.environ, "PYTHONPATH": str(converter_dir() / "gguf-py")}
    proc = subprocess.run([sys.executable, str(script), str(gguf_file), str(rewritten), "--force", *args],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ExportError(f"could not set the chat template / stop tokens in {gguf_file}: "
                          f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    os.replace(rewritten, gguf_file)


def check_gguf_metadata(gguf_file: Path, tokenizer, stops: list[int]) -> dict:
    """The GGUF's chat template equals the tokenizer's, and its eos is the first training stop id."""
    meta = read_metadata(gguf_file)
    problems = []
    if tokenizer.chat_template and meta.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("its tokenizer.chat_template differs from the training chat template")
    if stops and meta.get("tokenizer.ggml.eos_token_id") != stops[0]:
        problems.append(f"its eos token id is {meta.get('tokenizer.ggml.eos_token_id')}, training stops at {stops}")
    if problems:
        raise ExportError(f"{gguf_file}: " + "; ".join(problems))
    return meta


def file_size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def copy_into(source: Path, target: Path) -> None:
    """Move `source` to `target` (same filesystem: a rename), else copy then remove."""
    try:
        os.replace(source, target)
    except OSError:
        shutil.copyfile(source, target)
        source.unlink()


if __name__ == "__main__":  # python -m tuneforge.deploy.gguf_convert [VERSION]: fetch the converter (setup step)
    print(fetch_converter(sys.argv[1] if len(sys.argv) > 1 else None))
