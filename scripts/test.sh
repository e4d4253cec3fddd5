#!/usr/bin/env bash
# Run the test suite in both environments (each set up first by scripts/venv.sh):
#   1. .venv (e3nn 0.6, nequip, sevenn, tblite): every test;
#   2. .venv-mace (MACE's e3nn 0.4.4, mace-torch, tblite): the tests the e3nn version can change
#      (models, fast backend, equivariance, forces, the analysis) and the MACE tests.
# Extra arguments go to pytest and run in the first environment only (IRREPSCOPE_ENV=mace: in the second).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Two workers of one thread each (pytest-xdist): on 2 cores the suite's serial parts (imports,
# PHATE, the CLI's subprocesses, data loading) overlap instead of leaving a core idle.
# IRREPSCOPE_TEST_WORKERS=0 runs it in one process. --dist loadgroup: the Ray tests share one worker
# (and one Ray cluster); the rest are spread as usual.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
WORKERS=(-n "${IRREPSCOPE_TEST_WORKERS:-2}" --dist loadgroup)
E3NN_TESTS=(tests/test_e3nn_versions.py tests/test_mace.py tests/test_fast_tp.py tests/test_model.py tests/test_forces.py
            tests/test_interface.py tests/test_analysis.py
            --deselect "tests/test_analysis.py::test_phate_and_umap_maps_keep_structure")  # maps: no e3nn in them
if [ $# -gt 0 ]; then
    source "$ROOT/scripts/venv.sh"
    exec "$VENV/bin/python" -m pytest -q "${WORKERS[@]}" "$@"
fi
source "$ROOT/scripts/venv.sh"
echo "== tests in $VENV (e3nn $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("e3nn"))'))" >&2
"$VENV/bin/python" -m pytest -q "${WORKERS[@]}"
IRREPSCOPE_ENV=mace source "$ROOT/scripts/venv.sh"
echo "== tests in $VENV (e3nn $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("e3nn"))'))" >&2
exec "$VENV/bin/python" -m pytest -q "${WORKERS[@]}" "${E3NN_TESTS[@]}"
