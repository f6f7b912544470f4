#!/usr/bin/env bash
# Sets up (first time only) and runs the test suite. Extra arguments go to pytest (e.g. -k merge, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# One process by default: the browser, server and subprocess tests wait on real processes, and a second worker on a
# 2-core machine starves them. TUNEFORGE_TEST_WORKERS=2 runs two workers (pytest-xdist, whole files per worker).
workers="${TUNEFORGE_TEST_WORKERS:-0}"
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
