#!/usr/bin/env bash
# Sets up (first time only) and runs the test suite. Extra arguments go to pytest (e.g. -k merge).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Two passes. First the tests that wait on nothing but the CPU, on two pytest-xdist workers (whole files per worker;
# tiny models run single-threaded, so one process leaves a core of a 2-core machine idle). Then the tests marked
# `serial` (tests/conftest.py: servers, the browser, sandboxes, SIGKILLed runs, multi-process launches), alone.
# TUNEFORGE_TEST_WORKERS=0 runs everything in one process, in one pass.
workers="${TUNEFORGE_TEST_WORKERS:-2}"
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ "$workers" = 0 ]; then
  exec "${pytest[@]}" "$@"
fi
set +e
"${pytest[@]}" -n "$workers" --dist loadfile -m "not serial" "$@"
first=$?
"${pytest[@]}" -m serial "$@"
second=$?
set -e
# exit status 5 = no test selected in that pass (e.g. -k picked tests of one kind only)
if [ "$first" = 5 ] && [ "$second" = 5 ]; then exit 5; fi
for code in "$first" "$second"; do
  if [ "$code" != 0 ] && [ "$code" != 5 ]; then exit "$code"; fi
done
exit 0
