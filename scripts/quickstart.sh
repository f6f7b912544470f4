#!/usr/bin/env bash
# Sets up (first time only) and runs the quickstart: LoRA SFT of the embedded SmolLM2-135M-Instruct on the
# shipped JSON-extraction task, then the held-out exact-match score before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tuneforge train recipes/quickstart.yaml --overwrite "$@"
