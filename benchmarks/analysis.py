"""Per-stage time of the order-usage analysis on the QM9 test split, optionally side by side with another revision.

Builds a [0..6]/H=16 model (5 blocks, fast backend) with FRESH weights (seed 0): the
analysis costs the same whatever the weights, so no training is needed to time it. The
split is a random 80/10/10 split of all 130,831 molecules (test: 13,083), like a full run's.

    python benchmarks/analysis.py [--orders 0,1,2,3,4] [--max-molecules N] [--embedding phate|umap|pca]
                                  [--threads 2] [--baseline REV]

With ``--baseline REV`` (a git revision, e.g. the commit before a speed-up) the same
analysis runs first with that revision's code (its ``src`` from ``git archive``, in a
fresh process), then with this checkout's, one after the other (never side by side on
the same cores), each with its own defaults unless the counts are given, and a table
gives each stage's time in both and their ratio, the largest difference of the usage
numbers both compute on the same molecules (they must agree to float tolerance), where
the per-block ablations moved to the ablation subset what that costs against the whole
split's values, and the maps' scores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAME = ["ablation_delta_mae_ev", "norm_share_node", "norm_share_graph", "grad_x_input", "probe_r2"]  # compared across revisions
# Measured on the ablation subset since 2026-12 (before: the per-block rows on every analysed molecule).
SUBSET = ["ablation_delta_mae_ev", "grad_x_input"]


def measure(args: argparse.Namespace) -> dict:
    """Run the analysis once in this process (with whatever irrepscope is importable) and return timings and rows."""
    import numpy as np
    import torch

    from irrepscope.analysis.features import SplitPass
    from irrepscope.analysis.runner import analyze_model
    from irrepscope.config import ModelConfig
    from irrepscope.data import load_qm9, random_split
    from irrepscope.model.network import build_model

    import irrepscope

    torch.set_num_threads(args.threads)
    print(f"irrepscope from {Path(irrepscope.__file__).parent}", file=sys.stderr)
    t = time.perf_counter()
    mols = load_qm9(progress=False)
    split = random_split(len(mols), [0.8, 0.1, 0.1], seed=0)
    test = np.asarray(split["test"])[: args.max_molecules]
    print(f"loaded QM9 ({len(mols)} molecules) in {time.perf_counter() - t:.1f} s; analysing {len(test)} test molecules", file=sys.stderr)
    torch.manual_seed(0)
    model = build_model(ModelConfig(orders=[int(v) for v in args.orders.split(",")], hidden_mul=args.hidden)).eval()
    model.set_target_stats(-76.12, 10.32)
    print(f"model orders [{args.orders}] H={args.hidden}: {model.num_parameters():,} parameters, backend {model.backend} (fresh weights)", file=sys.stderr)
    options = dict(embedding=args.embedding, progress=not args.quiet)
    for name in ("map_molecules", "probe_molecules", "ablation_molecules", "batch_size"):
        if getattr(args, name) is not None:  # else the revision's own default
            options[name] = getattr(args, name)
    t0 = time.perf_counter()
    res = analyze_model(model, mols, test, np.asarray(split["train"]), target="U0_atomization", **options)
    total = time.perf_counter() - t0
    keys = ["block", "order", *SAME, *[f"{k}_{b}" for k in SUBSET for b in ("lo", "hi")]]
    rows = [{k: r.get(k) for k in keys} for r in res["rows"]]
    return {"timings_s": {**res["timings_s"], "total": total}, "rows": rows, "molecules": len(test),
            "model_mae": res["model_mae"], "ablation_molecules": res["ablation_molecules"], "maps": res["maps"],
            "probe_molecules": res["probe_molecules"],
            "per_block_subset": "gradient_positions" in SplitPass.__dataclass_fields__}  # fmt: skip


def _worker(args: argparse.Namespace, src: Path) -> dict:
    """:func:`measure` in a fresh process whose irrepscope is the one under ``src``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [sys.executable, __file__, "--worker", out.name, "--orders", args.orders, "--hidden", str(args.hidden),
                "--embedding", args.embedding, "--threads", str(args.threads)]  # fmt: skip
        for name in ("max_molecules", "ablation_molecules", "map_molecules", "probe_molecules", "batch_size"):
            if getattr(args, name) is not None:
                argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if args.quiet:
            argv.append("--quiet")
        env = {**os.environ, "PYTHONPATH": str(src)}
        subprocess.run(argv, env=env, check=True)
        return json.loads(Path(out.name).read_text())


def _number(v: object) -> bool:
    return isinstance(v, float) and v == v


def _largest_difference(a: list[dict], b: list[dict], skip: set[tuple[str, str]] = frozenset()) -> float:
    """The largest relative difference of the numbers both revisions computed on the same molecules
    (``skip``: (row kind, measure) pairs measured on different molecules)."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        kind = "all" if ra["block"] == "all" else "block"
        for k in SAME:
            x, y = ra.get(k), rb.get(k)
            if (kind, k) not in skip and _number(x) and _number(y):
                worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    return worst


def _subset_cost(old: list[dict], new: list[dict]) -> str:
    """Where the per-block ablations moved from every molecule to the ablation subset: how far the old whole-split
    values lie from the new ones, in units of the new interval's half-width, and how many lie inside it."""
    inside, total, worst = 0, 0, 0.0
    for ro, rn in zip(old, new, strict=True):
        if ro["block"] == "all":
            continue
        for k in SUBSET:
            x, y, lo, hi = ro.get(k), rn.get(k), rn.get(f"{k}_lo"), rn.get(f"{k}_hi")
            if all(_number(v) for v in (x, y, lo, hi)) and hi > lo:
                total += 1
                inside += lo <= x <= hi
                worst = max(worst, abs(x - y) / ((hi - lo) / 2))
    return (f"per-block ablations and grad x input on the subset: the whole split's values lie inside the subset's "
            f"intervals for {inside} of {total}, at most {worst:.2f} half-widths from the subset's values")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", default="0,1,2,3,4,5,6")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--max-molecules", type=int, default=None, help="shrink the test split (default: all 13,083)")
    # These and --batch-size default to each revision's own defaults (what a user of that revision gets).
    ap.add_argument("--ablation-molecules", type=int, default=None)
    ap.add_argument("--map-molecules", type=int, default=None)
    ap.add_argument("--probe-molecules", type=int, default=None)
    ap.add_argument("--embedding", default="phate", choices=["phate", "umap", "pca"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: each revision's own default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", metavar="REV", help="also time this git revision's code, before this checkout's")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(measure(args)))
        return
    if not args.baseline:
        res = _worker(args, ROOT / "src")
        for stage, seconds in res["timings_s"].items():
            print(f"{stage:>22}: {seconds:7.1f} s")
        print(f"({res['molecules']} molecules, {args.threads} threads; report writing not included)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "src"], check=True, capture_output=True).stdout
        path = Path(tmp) / "src.tar"
        path.write_bytes(archive)
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        print(f"timing {args.baseline} ...", file=sys.stderr)
        old = _worker(args, Path(tmp) / "src")
    print("timing this checkout ...", file=sys.stderr)
    new = _worker(args, ROOT / "src")
    stages = list(dict.fromkeys([*old["timings_s"], *new["timings_s"]]))
    print(f"{'stage':>22} {args.baseline[:10]:>10} {'this':>10} {'ratio':>7}")
    for stage in stages:
        a, b = old["timings_s"].get(stage), new["timings_s"].get(stage)
        ratio = f"{a / b:6.2f}x" if a and b else ""
        cell = lambda v: f"{v:9.1f}s" if v is not None else f"{'-':>10}"  # noqa: E731
        print(f"{stage:>22} {cell(a)} {cell(b)} {ratio:>7}")
    print(f"({new['molecules']} molecules, {args.threads} threads, one after the other; report writing not included)")
    # Numbers measured on different molecules by the two runs are not compared: the per-block ablations where
    # they ran on different molecules (all of them, or ablation subsets of different sizes), the all-blocks ones
    # where the subsets differ, the probes where they were fit on different molecules.
    per_block = [r["ablation_molecules"] if r.get("per_block_subset") else r["molecules"] for r in (old, new)]
    moved = per_block[0] != per_block[1]
    skip = {("block", k) for k in SUBSET} if moved else set()
    if old["ablation_molecules"] != new["ablation_molecules"]:
        skip.add(("all", "ablation_delta_mae_ev"))
    if old.get("probe_molecules") != new["probe_molecules"]:
        skip.add(("block", "probe_r2"))
    compared = [f"{w}:{k}" for w in ("block", "all") for k in SAME if (w, k) not in skip]
    print(f"ablation molecules {old['ablation_molecules']} vs {new['ablation_molecules']}, probes fit on "
          f"{old.get('probe_molecules')} vs {new['probe_molecules']}; compared on the same molecules: {', '.join(compared)}")  # fmt: skip
    print(f"largest relative difference of the usage numbers both compute on the same molecules: "
          f"{_largest_difference(old['rows'], new['rows'], skip):.2e}; model MAE {old['model_mae']:.6g} vs {new['model_mae']:.6g}")  # fmt: skip
    if moved and per_block[0] == new["molecules"]:  # the previous revision measured them on every molecule
        print(_subset_cost(old["rows"], new["rows"]))
    for name in new["maps"]:
        a, b = old["maps"].get(name, {}), new["maps"][name]
        print(f"map {name:>6}: kNN R^2 {a.get('knn_r2', float('nan')):.3f} vs {b['knn_r2']:.3f}, "
              f"trustworthiness {a.get('trustworthiness', float('nan')):.3f} vs {b['trustworthiness']:.3f}")


if __name__ == "__main__":
    main()
