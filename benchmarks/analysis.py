"""Per-stage time of the order-usage analysis on the QM9 test split.

Builds a [0..6]/H=16 model (5 blocks, fast backend) with FRESH weights (seed 0): the
analysis costs the same whatever the weights, so no training is needed to time it. The
split is a random 80/10/10 split of all 130,831 molecules (test: 13,083), like a full run's.

    python benchmarks/analysis.py [--max-molecules N] [--embedding phate|umap|pca] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from irrepscope.analysis.runner import ABLATION_MOLECULES, MAP_MOLECULES, PROBE_MOLECULES, analyze_model
from irrepscope.config import ModelConfig
from irrepscope.data import load_qm9, random_split
from irrepscope.model.network import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", default="0,1,2,3,4,5,6")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--max-molecules", type=int, default=None, help="shrink the test split (default: all 13,083)")
    ap.add_argument("--ablation-molecules", type=int, default=ABLATION_MOLECULES)
    ap.add_argument("--map-molecules", type=int, default=MAP_MOLECULES)
    ap.add_argument("--probe-molecules", type=int, default=PROBE_MOLECULES)
    ap.add_argument("--embedding", default="phate", choices=["phate", "umap", "pca"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    mols = load_qm9(progress=False)
    split = random_split(len(mols), [0.8, 0.1, 0.1], seed=0)
    test = np.asarray(split["test"])[: args.max_molecules]
    print(f"loaded QM9 ({len(mols)} molecules) in {time.perf_counter() - t:.1f} s; analysing {len(test)} test molecules")
    torch.manual_seed(0)
    model = build_model(ModelConfig(orders=[int(v) for v in args.orders.split(",")], hidden_mul=args.hidden)).eval()
    model.set_target_stats(-76.12, 10.32)
    print(f"model orders [{args.orders}] H={args.hidden}: {model.num_parameters():,} parameters, backend {model.backend} (fresh weights)")
    t0 = time.perf_counter()
    res = analyze_model(
        model,
        mols,
        test,
        np.asarray(split["train"]),
        target="U0_atomization",
        embedding=args.embedding,
        map_molecules=args.map_molecules,
        probe_molecules=args.probe_molecules,
        ablation_molecules=args.ablation_molecules,
        batch_size=args.batch_size,
        progress=True,
    )
    total = time.perf_counter() - t0
    for stage, seconds in res["timings_s"].items():
        print(f"{stage:>22}: {seconds:7.1f} s")
    print(f"{'total':>22}: {total:7.1f} s  ({len(test)} molecules, {args.threads} threads; report writing not included)")


if __name__ == "__main__":
    main()
