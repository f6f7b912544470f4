#!/usr/bin/env bash
# Sets up (first time only) and runs the test suite. Extra arguments go to pytest (e.g. -k merge, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Two workers (a CI machine has 2 cores; tiny models run single-threaded), each taking whole test files so their
# module fixtures are built once. TUNEFORGE_TEST_WORKERS=0 runs in this process.
workers="${TUNEFORGE_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
