#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install irrepscope into it.
# Sourced by scripts/demo.sh and scripts/test.sh (the optional extras the tests use, nequip,
# tblite and sevenn included, are installed too); reinstalls only when pyproject.toml or the
# constraints change. torch is pinned to the CPU build on the machines' disk (constraints/dev.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IRREPSCOPE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
STAMP="$VENV/.irrepscope-install"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints/dev.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "installing irrepscope and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints/dev.txt" -e "$ROOT[test,nequip,xtb,sevenn]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
