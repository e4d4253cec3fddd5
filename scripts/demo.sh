#!/usr/bin/env bash
# The demo: train a small model on a real QM9 subset, evaluate it on its held-out test
# split and write a report. Sets up .venv first. Output goes to ${1:-demo_run}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/venv.sh"
cd "$ROOT"
OUT="${1:-demo_run}"
if [ -e "$OUT/checkpoints/last.pt" ]; then
    echo "$OUT already holds a run: remove it or pass another directory" >&2
    exit 2
fi
irrepscope info configs/quick/demo.yaml
irrepscope train configs/quick/demo.yaml --out "$OUT"
irrepscope analyze "$OUT"
python - "$OUT/test.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print(f"test MAE {t['mae_ev']:.4f} eV on {t['n']} held-out molecules; composition baseline on the same molecules "
      f"{t['baseline_mae_ev']:.4f} eV ({t['baseline_mae_ev'] / t['mae_ev']:.1f}x the model's error)")
PY
echo "run written to $OUT (config.yaml, split.json, composition.json, metrics.csv, checkpoints/, test.json)"
echo "report: $OUT/analysis/report.html"
