#!/usr/bin/env bash
# The tools `tuneforge export --format gguf|ollama` stands on, all from one llama.cpp version. `scripts/setup.sh test`
# does the same through the `export` extra; this script is for a quickstart install that later wants GGUF export.
#   1. llama-cpp-python: llama.cpp's quantizer and runtime (PyPI ships it as an sdist, so pip compiles llama.cpp:
#      about 9 minutes on 2 shared CPU cores here), at the version pinned in pyproject.toml's `export` extra (the one
#      place llama.cpp's version is chosen; LLAMA_CPP_PYTHON_VERSION overrides it);
#   2. sentencepiece: llama.cpp's converter imports it for every Llama-family model;
#   3. llama.cpp's own convert_hf_to_gguf.py (+ its conversion/ package and gguf-py/), which no wheel ships: taken
#      from the same version's sdist (pip download), extracted into $TUNEFORGE_CACHE/llama.cpp/<version>/
#      (default ~/.cache/tuneforge). Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
PINNED="$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$PINNED}"
[ -n "$VERSION" ] || { echo "[llama.cpp] no llama-cpp-python==X pin in pyproject.toml's export extra" >&2; exit 1; }
installed="$("$VPY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
if [ "$installed" != "$VERSION" ]; then
  echo "[llama.cpp] building llama-cpp-python==$VERSION (compiles llama.cpp; minutes)" >&2
  "$VPY" -m pip install -q "llama-cpp-python==$VERSION"
fi
"$VPY" -c "import sentencepiece" 2>/dev/null || "$VPY" -m pip install -q "sentencepiece>=0.1.98,<0.3"
"$VPY" -m tuneforge.deploy.gguf_convert "$VERSION" >/dev/null   # the converter, from the sdist of that version
echo "[llama.cpp] ready: llama-cpp-python $VERSION and its convert_hf_to_gguf.py" >&2
