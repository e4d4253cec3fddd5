"""A small sweep without Ray and through a local Ray cluster, one after the other: wall times and equal results.

    python benchmarks/sweep_ray.py [--seeds 0,1] [--epochs 3] [--limit 400] [--cpus-per-run 1] [--workers 1]

The sweep: the tiny config (configs/quick/tiny.yaml) with orders [0,1,2] and [0,2] over the
seeds, on ``--limit`` QM9 molecules, one torch thread per run (``train.threads: 1``, so the
two engines compute the same bits). It runs three times from scratch, never two at once:
``irrepscope sweep`` alone (one run after another), with ``--workers`` local processes
(if > 1), and with ``--ray`` (a local Ray cluster started for it, ``--cpus-per-run`` CPUs
per run, so 2 cores hold 2 runs at once). Each is a fresh ``irrepscope`` process, timed
whole (start-up, Ray's included). Prints a table of wall times and their ratio to the
plain sweep, and whether every run's metrics and test numbers equal the plain sweep's
(timings aside).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"train_seconds", "epoch_seconds", "molecules_per_s"}


def numbers(out: Path) -> dict[str, object]:
    """Every run's metrics rows and test.json, timings aside."""
    result = {}
    for run in sorted((out / "runs").glob("*/seed*")):
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader((run / "metrics.csv").open())]
        test = {k: v for k, v in json.loads((run / "test.json").read_text()).items() if k != "pins"}
        result[run.relative_to(out).as_posix()] = (rows, test)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--cpus-per-run", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tiny = ROOT / "configs" / "quick" / "tiny.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "bench.yaml"
        sweep.write_text(
            f"name: bench\nconfigs:\n  - {{name: l012, config: {tiny}}}\n"
            f"  - {{name: l02, config: {tiny}, set: {{model.orders: [0, 2]}}}}\nseeds: {seeds}\n"
            f"set:\n  data.limit: {args.limit}\n  train.epochs: {args.epochs}\n  train.threads: 1\n"
        )
        engines = [("without Ray, one run at a time", [])]
        if args.workers > 1:
            engines.append((f"without Ray, --workers {args.workers}", ["--workers", str(args.workers)]))
        engines.append((f"--ray (local cluster), --cpus-per-run {args.cpus_per_run:g}", ["--ray", "--cpus-per-run", str(args.cpus_per_run)]))
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        times, results = [], []
        for i, (label, extra) in enumerate(engines):
            out = Path(tmp) / f"out{i}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "irrepscope", "sweep", str(sweep), "--out", str(out), "--quiet", *extra],
                           check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
            times.append(time.perf_counter() - start)
            results.append(numbers(out))
            print(f"{label}: {times[-1]:.1f} s", file=sys.stderr)
    runs = len(results[0])
    print(f"\nsweep: 2 configurations x {len(seeds)} seeds = {runs} runs, {args.epochs} epochs on {args.limit} molecules, "
          f"one torch thread per run, {os.cpu_count()} cores\n")  # fmt: skip
    print("| engine | wall time (s) | vs one at a time | same numbers as one at a time |")
    print("|---|---|---|---|")
    for (label, _), t, r in zip(engines, times, results):
        print(f"| {label} | {t:.1f} | {times[0] / t:.2f}x | {'yes' if r == results[0] else 'NO'} |")


if __name__ == "__main__":
    main()
