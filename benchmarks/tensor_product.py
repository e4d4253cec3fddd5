#!/usr/bin/env python
"""Throughput of the reference model with the e3nn and the fast tensor product backends.

For each configuration (order list / multiplicity H) the full model (5 blocks) is built
once; both backends start from the same weights and see the same batches. Per backend:

* one training step profiled for memory (it is also the warm-up),
* ``steps`` timed training steps (forward, MSE on the standardised target, backward,
  AdamW step), the two backends' steps interleaved so that a drift in machine speed
  hits both alike,
* timed inference passes (forward only, ``torch.no_grad``), interleaved the same way.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the profiled step, minus what
was allocated at its start. On CPU, the peak over the step of the bytes held by
PyTorch's CPU allocator, replayed from the profiler's memory events
(``profile_memory=True``), minus what was held at the start of the step. Both count
tensors only (not the interpreter, libraries or allocator slack) and net allocations
made and freed within one operator.

Data: real QM9 bond-graph batches (shuffled with a fixed seed). With ``--forces``: force-field
training, the model on radius graphs (5 Å, polynomial envelope) of the shipped GFN2-xTB frames
(``data.source: qm9_xtb``), each step a loss on the energy and on the forces ``-dE/dx``
(the gradient kept for the backward: a double backward through the tensor products).

    python benchmarks/tensor_product.py                      # all configurations, a table
    python benchmarks/tensor_product.py --json --configs 0-2/32 0-6/16 --steps 5
    python benchmarks/tensor_product.py --forces --configs 0-2/32 0-4/16
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from irrepscope.config import ModelConfig
from irrepscope.model.network import build_model

# name -> (orders, H, default timed training steps of e3nn, of fast)
CONFIGS = {
    "0-2/32": ([0, 1, 2], 32, 5, 20),
    "0-4/16": ([0, 1, 2, 3, 4], 16, 2, 15),
    "0,3,4,5,6/16": ([0, 3, 4, 5, 6], 16, 2, 10),
    "0-6/16": ([0, 1, 2, 3, 4, 5, 6], 16, 1, 10),
    "0-8/16": ([0, 1, 2, 3, 4, 5, 6, 7, 8], 16, 1, 6),
}
TARGET_MEAN, TARGET_STD = -76.12, 10.32  # eV, U0 atomization energy over QM9 (the brief)


def parse_config(text: str) -> tuple[str, list[int], int]:
    """``"0-6/16"`` or ``"0,3,4,5,6/16"`` (orders/H) -> (name, orders, H)."""
    if text in CONFIGS:
        return text, CONFIGS[text][0], CONFIGS[text][1]
    try:
        orders_text, mul = text.split("/")
        orders: list[int] = []
        for part in orders_text.split(","):
            lo, _, hi = part.partition("-")
            orders += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        return text, orders, int(mul)
    except ValueError:
        raise SystemExit(f"bad configuration {text!r}: expected orders/H such as 0-6/16 or 0,3,4,5,6/16") from None


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def qm9_batches(n: int, batch_size: int, dtype: torch.dtype, seed: int = 0) -> list:
    import numpy as np

    from irrepscope.data.batching import iterate_batches
    from irrepscope.data.qm9 import load_qm9

    mols = load_qm9(progress=False)
    it = iterate_batches(
        mols, np.arange(len(mols)), batch_size, shuffle=True, seed=seed, target="U0_atomization", dtype=dtype
    )
    return [next(it) for _ in range(n)]


FORCE_CUTOFF = 5.0  # Å: the radius graph of --forces (what configs/forcefield use)


def xtb_batches(n: int, batch_size: int, dtype: torch.dtype, seed: int = 0) -> list:
    """Shuffled radius-graph batches of the shipped GFN2-xTB frames, with their forces."""
    import numpy as np

    from irrepscope.config import DataConfig
    from irrepscope.data.batching import iterate_batches
    from irrepscope.data.sources import load_structures

    data = DataConfig(source="qm9_xtb", target="energy")
    data.validate()
    structures = load_structures(data)
    it = iterate_batches(
        structures, np.arange(len(structures)), batch_size, shuffle=True, seed=seed, target="energy",
        graph="radius", cutoff=FORCE_CUTOFF, dtype=dtype, forces=True,
    )  # fmt: skip
    return [next(it) for _ in range(n)]


def to_device(batch, device: torch.device):
    return batch if device.type == "cpu" else batch.to(device)


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


class Runner:
    """One backend's model and optimiser, with a training step and an inference pass."""

    def __init__(self, model: torch.nn.Module, backend: str, forces: bool = False) -> None:
        self.model = model
        self.model.set_backend(backend)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.forces = forces

    def train_step(self, batch) -> None:
        if self.forces:  # what the trainer does with train.force_weight > 0
            from irrepscope.model.network import energy_and_forces

            out, forces = energy_and_forces(self.model, batch, create_graph=True)
        else:
            out = self.model(batch)
        target = (batch.y - self.model.target_mean) / self.model.target_std
        loss = torch.nn.functional.mse_loss(out.standardized, target)
        if self.forces:
            loss = loss + torch.nn.functional.mse_loss(forces, batch.forces)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def infer(self, batch) -> None:
        with torch.no_grad():
            self.model(batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes of tensors allocated during ``fn()`` above what was held at its start."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations inside an operator are reported on the operator (net of what it freed),
    # frees outside operators as "[memory]" events: replay both in time order.
    changes = [
        (e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for _, delta in sorted(changes, key=lambda c: c[0]):
        current += delta
        peak = max(peak, current)
    return peak


def interleave(counts: dict[str, int]) -> list[str]:
    """Spread each key's ``count`` slots evenly over one schedule: {"a": 1, "b": 3} -> [b, a, b, b]."""
    slots = [((i + 0.5) / n, key) for key, n in counts.items() for i in range(n)]
    return [key for _, key in sorted(slots)]


def timed(schedule: list[str], action, batches: list, device: torch.device) -> dict[str, float]:
    """Run ``action(key, batch)`` along the schedule; molecules per second of each key."""
    elapsed = {k: 0.0 for k in schedule}
    molecules = {k: 0 for k in schedule}
    for i, key in enumerate(schedule):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        action(key, batch)
        sync(device)
        elapsed[key] += time.perf_counter() - t0
        molecules[key] += batch.num_graphs
    return {k: molecules[k] / elapsed[k] for k in elapsed}


def run_config(name, orders, mul, steps, infer_steps, batches, device, dtype, forces: bool = False) -> dict:
    torch.manual_seed(0)
    extra = {"cutoff": FORCE_CUTOFF, "radial_envelope": "polynomial"} if forces else {}
    base = build_model(ModelConfig(orders=orders, hidden_mul=mul, backend="e3nn", **extra)).to(device=device, dtype=dtype)
    if forces:  # the xTB frames' total energies, per-element reference not modelled here (the cost does not depend on it)
        y = torch.cat([b.y for b in batches])
        base.set_target_stats(float(y.mean()), float(y.std()))
    else:
        base.set_target_stats(TARGET_MEAN, TARGET_STD)
    runners = {"e3nn": Runner(base, "e3nn", forces), "fast": Runner(copy.deepcopy(base), "fast", forces)}
    result = {"config": name, "orders": orders, "H": mul, "params": base.num_parameters()}
    for backend, runner in runners.items():  # warm-up, profiled for memory
        result[f"peak_mb_{backend}"] = peak_memory(lambda r=runner: r.train_step(batches[0]), device) / 2**20
    train = timed(interleave(steps), lambda k, b: runners[k].train_step(b), batches[1:], device)
    infer = timed(interleave(infer_steps), lambda k, b: runners[k].infer(b), batches[1:], device)
    for backend in runners:
        result[f"train_mol_s_{backend}"] = train[backend]
        result[f"infer_mol_s_{backend}"] = infer[backend]
    result["train_speedup"] = train["fast"] / train["e3nn"]
    result["infer_speedup"] = infer["fast"] / infer["e3nn"]
    result["memory_ratio"] = result["peak_mb_fast"] / result["peak_mb_e3nn"]
    result["steps"] = steps
    result["infer_steps"] = infer_steps
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="orders/H, e.g. 0-2/32 0,3,4,5,6/16")
    parser.add_argument("--steps", type=int, help="timed training steps per backend (default: per configuration)")
    parser.add_argument("--e3nn-steps", type=int, help="timed training steps of e3nn only (it is slow)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration per line")
    parser.add_argument("--forces", action="store_true", help="force-field training on the shipped xTB frames (radius graphs)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    configs = [parse_config(c) for c in args.configs]
    plans = []
    for name, orders, mul in configs:
        e3nn_steps, fast_steps = CONFIGS[name][2:] if name in CONFIGS else (2, 10)
        if args.steps:
            e3nn_steps = fast_steps = args.steps
        if args.e3nn_steps:
            e3nn_steps = args.e3nn_steps
        plans.append((name, orders, mul, {"e3nn": e3nn_steps, "fast": fast_steps}))
    n_batches = 1 + max(max(p[3].values()) for p in plans)
    if args.forces:
        batches, source = xtb_batches(min(n_batches, 64), args.batch_size, dtype), "GFN2-xTB frames, radius graphs 5 A, energy+forces"
    else:
        batches, source = qm9_batches(min(n_batches, 64), args.batch_size, dtype), "QM9 bond graphs"
    batches = [to_device(b, device) for b in batches]
    edges = sum(b.edge_src.numel() for b in batches) / sum(b.num_graphs for b in batches)
    atoms = sum(b.z.numel() for b in batches) / sum(b.num_graphs for b in batches)
    header = dict(
        data=source, batch_size=args.batch_size, atoms_per_molecule=round(atoms, 2), edges_per_molecule=round(edges, 2),
        device=str(device), dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__,
    )
    if not args.json:
        print("# " + ", ".join(f"{k}={v}" for k, v in header.items()))
        print(
            f"{'config':<14}{'params':>8} | {'train mol/s e3nn':>16}{'fast':>8}{'x':>7} | "
            f"{'infer mol/s e3nn':>16}{'fast':>8}{'x':>7} | {'peak MB e3nn':>12}{'fast':>8}{'ratio':>7}"
        )
    for name, orders, mul, steps in plans:
        infer_steps = {"e3nn": max(1, steps["e3nn"]), "fast": steps["fast"]}
        r = run_config(name, orders, mul, steps, infer_steps, batches, device, dtype, args.forces)
        if args.json:
            print(json.dumps({**r, **header}), flush=True)
        else:
            print(
                f"{name:<14}{r['params'] / 1e6:>7.2f}M | {r['train_mol_s_e3nn']:>16.2f}{r['train_mol_s_fast']:>8.1f}"
                f"{r['train_speedup']:>6.1f}x | {r['infer_mol_s_e3nn']:>16.2f}{r['infer_mol_s_fast']:>8.1f}"
                f"{r['infer_speedup']:>6.1f}x | {r['peak_mb_e3nn']:>12.1f}{r['peak_mb_fast']:>8.1f}{r['memory_ratio']:>7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
