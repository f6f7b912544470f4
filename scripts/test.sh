#!/usr/bin/env bash
# Sets up (first time only) and runs the test suite. Extra arguments go to pytest (e.g. -k merge, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
