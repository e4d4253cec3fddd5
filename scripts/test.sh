#!/usr/bin/env bash
# Run the test suite (sets up .venv first). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"
cd "$ROOT"
# Two workers of one thread each (pytest-xdist): on 2 cores the suite's serial parts (imports,
# PHATE, the CLI's subprocesses, data loading) overlap instead of leaving a core idle.
# IRREPSCOPE_TEST_WORKERS=0 runs it in one process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -n "${IRREPSCOPE_TEST_WORKERS:-2}" "$@"
