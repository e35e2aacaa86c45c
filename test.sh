#!/usr/bin/env bash
# The test suite on a fresh machine: .venv, dependencies, then pytest. Extra arguments go to pytest,
# e.g. ./test.sh -m "not slow" for a quick loop, or ./test.sh tests/nanochat/test_config.py.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh test,bench,jax
scripts/setup-test-tools.sh
export PATH="$PWD/.tools/bin:$PATH"
export PYTHONUNBUFFERED=1
# Two workers (pytest-xdist), each taking whole files, the files with the most tests first (xdist's order):
# a third of a serial run waits on Ray, servers and clusters starting, which the other worker fills.
# NANOCHAT_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -n "${NANOCHAT_TEST_WORKERS:-2}" --dist loadfile "$@"
