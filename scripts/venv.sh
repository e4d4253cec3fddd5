#!/usr/bin/env bash
# Create or reuse a virtual environment and install irrepscope into it. Sourced by scripts/demo.sh
# and scripts/test.sh. Two environments (e3nn has two camps, see README "Two environments"):
#   .venv       (default): the optional extras the tests use, nequip, tblite, sevenn and ray (e3nn 0.6);
#   .venv-mace  (IRREPSCOPE_ENV=mace): MACE with its pin e3nn 0.4.4, and tblite.
# Reinstalls only when pyproject.toml, the constraints or the extras change. torch is pinned to the
# CPU build on the machines' disk (constraints/dev.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${IRREPSCOPE_ENV:-main}" in
    main) VENV="${IRREPSCOPE_VENV:-$ROOT/.venv}"; EXTRAS="test,nequip,xtb,sevenn,ray"; CONSTRAINTS=("$ROOT/constraints/dev.txt") ;;
    mace) VENV="${IRREPSCOPE_MACE_VENV:-$ROOT/.venv-mace}"; EXTRAS="test,xtb,mace"
          CONSTRAINTS=("$ROOT/constraints/dev.txt" "$ROOT/constraints/mace.txt") ;;
    *) echo "error: IRREPSCOPE_ENV must be main or mace, got ${IRREPSCOPE_ENV}" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
STAMP="$VENV/.irrepscope-install"
WANT="$( (cat "$ROOT/pyproject.toml" "${CONSTRAINTS[@]}"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "installing irrepscope[$EXTRAS] and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q "${CONSTRAINTS[@]/#/--constraint=}" -e "$ROOT[$EXTRAS]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
