"""Speed of the data layer, each measured side by side with what it is compared to.

What tests/test_data.py used to assert with wall-clock limits (which flake on a busy
machine), measured here as ratios taken in one process, one right after the other:

* cache: loading QM9 from the cache vs parsing the ``qm9pack`` CSVs (both into a fresh
  temporary cache folder: the user's cache is neither read nor written). The old test
  asked for a cache load under 2 s.
* batching: molecules/s of ``iterate_batches`` (shuffled bond-graph batches of 32) vs
  molecules/s of training steps of a small fast-backend model on the same batches: how
  many times faster than training batching is, i.e. whether it can be the bottleneck.
  The old test asked for more than 20,000 molecules/s.

    python benchmarks/data.py [--molecules 20000] [--orders 0,1,2] [--hidden 16] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from irrepscope.config import ModelConfig
from irrepscope.data import iterate_batches, load_qm9
from irrepscope.model.network import build_model

TARGET = "U0_atomization"
TARGET_MEAN, TARGET_STD = -76.12, 10.32  # eV, U0 atomization energy over QM9 (the brief)


def time_cache() -> tuple[float, float]:
    """(seconds to parse the CSVs and write a cache, seconds to load that cache), in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="irrepscope-bench-") as tmp:
        start = time.perf_counter()
        load_qm9(tmp, progress=False)  # no cache there yet: parses and writes one
        parse = time.perf_counter() - start
        start = time.perf_counter()
        load_qm9(tmp, progress=False)
        return parse, time.perf_counter() - start


def time_batching(mols, n: int, batch_size: int) -> float:
    """Structures/s of shuffled batching of the first ``n`` molecules."""
    start = time.perf_counter()
    count = sum(b.num_graphs for b in iterate_batches(mols, np.arange(n), batch_size, shuffle=True, seed=0, target=TARGET))
    return count / (time.perf_counter() - start)


def time_training(mols, orders: list[int], hidden: int, steps: int, batch_size: int) -> float:
    """Structures/s of ``steps`` training steps (after one warm-up step) on pre-built shuffled batches."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(orders=orders, hidden_mul=hidden))
    model.set_target_stats(TARGET_MEAN, TARGET_STD)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = iterate_batches(mols, np.arange(len(mols)), batch_size, shuffle=True, seed=0, target=TARGET)
    batches = [next(it) for _ in range(steps + 1)]

    def step(batch) -> None:
        loss = torch.nn.functional.mse_loss(model(batch).standardized, (batch.y - TARGET_MEAN) / TARGET_STD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up: first-call allocations and caches
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return sum(b.num_graphs for b in batches[1:]) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", type=int, default=20_000, help="molecules to batch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--orders", default="0,1,2")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    parse, cached = time_cache()
    print(f"cache:    parse {parse:6.2f} s   load from cache {cached:6.2f} s   parse/cache {parse / cached:6.1f}x")

    mols = load_qm9(progress=False)
    batching = time_batching(mols, args.molecules, args.batch_size)
    orders = [int(v) for v in args.orders.split(",")]
    training = time_training(mols, orders, args.hidden, args.steps, args.batch_size)
    print(
        f"batching: {batching:8.0f} molecules/s   training [{args.orders}]/H={args.hidden} (fast) {training:6.1f} molecules/s   "
        f"batching/training {batching / training:6.1f}x"
    )
    print(f"({args.threads} threads, batches of {args.batch_size}; ratios are what to compare across machines)")


if __name__ == "__main__":
    main()
