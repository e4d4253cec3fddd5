"""The analysis stages, each with a progress bar: :func:`analyze_model` on any analysed model.

It computes and returns; writing files (usage.csv, usage.json, the report) is the report
layer's (:func:`irrepscope.report.analysis.write_analysis`), and
:func:`irrepscope.api.analyze_run` does both for a run directory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from irrepscope.analysis import bootstrap, complexity, latent, usage
from irrepscope.analysis.bootstrap import Resampler
from irrepscope.analysis.features import SplitPass, collect
from irrepscope.analysis.force_usage import ForcePass, force_pass
from irrepscope.analysis.interface import AnalysedModel
from irrepscope.analysis.own_model import as_analysed
from irrepscope.data.composition import FORCE_UNIT, baseline_errors, baseline_name, baseline_residuals, baseline_rule, unit_of
from irrepscope.data.structures import FORCES, SMILES, Structures
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import EquivariantGraphConv

SPLITS = ("test", "val", "train")
MAP_MOLECULES = 2000  # PHATE on 13k points takes minutes; maps use a seeded subset (--map-molecules)
# Every ablation is a paired comparison (the same molecules with and without the order), so a
# seeded subset measures it tightly, and its intervals say how tightly: the gradient pass and
# the all-blocks ablation (blocks re-run once per order) run on it alone.
ABLATION_MOLECULES = 2000
PROBE_MOLECULES = 1000  # the probe (a ridge on <= H features) is fit on this many molecules of the training split
# Molecules per analysis batch: on 2 CPU cores 128 runs the gradient pass 1.2x (one thread: 1.4x)
# faster than 256, whose tensor-product intermediates no longer fit in cache (benchmarks/analysis.py).
BATCH_SIZE = 128


def progress_bar(enabled: bool):
    """A ``progress(iterable, total, desc)`` callable: a tqdm bar, or the iterable itself when disabled."""
    from tqdm.auto import tqdm

    def progress(it: Iterable, total: int, desc: str) -> Iterable:
        return tqdm(it, total=total, desc=desc, disable=not enabled, leave=False, unit="batch" if "maps" not in desc else "map")

    return progress


def check_orders(requested: list[int] | None, model_orders: list[int]) -> list[int]:
    """The orders to analyse: all of the model's, or ``requested`` if the model has every one of them."""
    if requested is None:
        return list(model_orders)
    missing = sorted(set(requested) - set(model_orders))
    if missing:
        raise IrrepscopeError(f"the model has no order(s) {missing}; its orders are {model_orders}")
    return sorted(set(requested))


def _subset(n: int, size: int | None, seed: int) -> np.ndarray:
    """Positions of a seeded random subset of ``size`` of ``n`` items (all of them when ``size`` is None or >= n), sorted."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def probe_fit_indices(eval_indices: np.ndarray, train_indices: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """The training molecules to fit the probes on, chosen so that analysed molecules are left to score them on.

    A seeded subset of ``size`` (None: all) training molecules that are not being analysed.
    Only where there are fewer such molecules (the analysed split is the training split)
    are the rest drawn from the analysed ones, at most half of them; the probe is then
    scored on the analysed molecules it was not fit on (:func:`usage.usage_rows`).
    """
    outside = train_indices[~np.isin(train_indices, eval_indices)]  # split order kept: the same pick as before for test/val
    fit = outside[_subset(len(outside), size, seed)]
    missing = (len(train_indices) if size is None else size) - len(fit)
    inside = eval_indices[np.isin(eval_indices, train_indices)]
    if missing > 0 and len(inside) > 0:
        extra = inside[_subset(len(inside), min(missing, len(inside) // 2), seed + 1)]
        fit = np.concatenate([fit, extra])
    return fit


def _force_summary(forces: ForcePass) -> dict[str, Any]:
    """usage.json's force fields: the model's force errors beside the zero-force baseline's, on the same atoms."""
    return {
        "force_mae": forces.force_mae,
        "force_rmse": forces.force_rmse,
        "force_baseline_mae": forces.baseline_mae,
        "force_unit": FORCE_UNIT,
        "force_structures": int(len(forces.indices)),
        "force_atoms": forces.num_atoms,
        "force_rule": "force MAE per component with the order zeroed (forces recomputed through the hooked model) minus "
        "the model's, on the ablation_molecules structures; unused below threshold x force_mae; the zero-force "
        "baseline predicts no force",
    }


def analyze_model(
    model: AnalysedModel | EquivariantGraphConv,
    mols: Structures,
    eval_indices: np.ndarray,
    train_indices: np.ndarray,
    *,
    target: str,
    graph: str = "bond",
    cutoff: float = 6.0,
    orders: list[int] | None = None,
    embedding: str = "phate",
    map_molecules: int | None = MAP_MOLECULES,
    probe_molecules: int | None = PROBE_MOLECULES,
    ablation_molecules: int | None = ABLATION_MOLECULES,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    threshold: float = usage.THRESHOLD,
    progress: bool = True,
    analyse_forces: bool | None = None,
    resamples: int = bootstrap.RESAMPLES,
    level: float = bootstrap.LEVEL,
) -> dict[str, Any]:
    """Every analysis stage on ``mols[eval_indices]``; returns the usage.json content plus map arrays (key ``_maps``).

    The probes are fit on training molecules (:func:`probe_fit_indices`) and always scored
    on analysed molecules they were not fit on, also when ``eval_indices`` are training
    molecules. Every ablation and ``grad_x_input`` are measured on a seeded subset of
    ``ablation_molecules`` (the gradient pass runs on it alone, the rest forward only), and
    the verdicts use the model's MAE there (``ablation_model_mae``).
    ``analyse_forces`` (default: when the structures carry forces and the model computes
    them) adds the force ablations on that same subset (:mod:`~irrepscope.analysis.force_usage`).
    Every usage number and the MAEs carry a ``level`` bootstrap interval over the analysed
    molecules (``resamples`` resamples, seeded by ``seed``); verdicts say ``uncertain`` where
    the interval straddles the threshold.
    """
    threshold = usage.check_threshold(threshold)
    for name, value in (("map_molecules", map_molecules), ("probe_molecules", probe_molecules),
                        ("ablation_molecules", ablation_molecules)):  # fmt: skip
        usage.check_count(value, name)
    for name, value in (("batch_size", batch_size), ("resamples", resamples)):
        if usage.check_count(value, name) is None:
            raise IrrepscopeError(f"{name} must be a positive integer, got None")
    bootstrap.interval(np.zeros(1), level)  # a level outside (0, 1) is an error before any work
    model = as_analysed(model, graph, cutoff)
    orders = check_orders(orders, model.orders)
    if len(eval_indices) == 0:
        raise IrrepscopeError("the split to analyse is empty (check --max-molecules)")
    if embedding not in latent.EMBEDDINGS:
        raise IrrepscopeError(f"unknown embedding {embedding!r}; choose one of {latent.EMBEDDINGS}")
    bar = progress_bar(progress)
    timings: dict[str, float] = {}
    common = dict(target=target, orders=orders, batch_size=batch_size)

    # Every ablation (per block, after every block, of the forces) and grad x input are measured on one seeded
    # subset: they are paired comparisons, which a few thousand molecules measure tightly (the intervals say how
    # tightly); the forward pass (MAEs, norm shares, probes, maps) covers every analysed molecule.
    abl_pos = _subset(len(eval_indices), ablation_molecules, seed)
    t = time.perf_counter()
    ev: SplitPass = collect(
        model, mols, eval_indices, gradients=True, gradient_positions=abl_pos, progress=bar, desc="features+gradients",
        **common,
    )  # fmt: skip
    timings["features_gradients"] = time.perf_counter() - t

    # Zeroing an order after every block cannot be read off one gradient: re-run per order.
    t = time.perf_counter()
    ablated = {l: [] for l in orders}
    batches = model.batches(mols, eval_indices[abl_pos], batch_size)
    for batch in bar(batches, math.ceil(len(abl_pos) / batch_size), "all-blocks ablation"):
        for l, p in model.all_blocks_ablation(batch, orders).items():
            ablated[l].append(p.double().cpu().numpy())
    # The deltas are measured on this subset, so the verdict compares them with the MAE on it.
    ablation_mae = usage.mae(ev.prediction[abl_pos], ev.target[abl_pos])
    all_blocks = {l: np.concatenate(ablated[l]) for l in orders}
    timings["all_blocks_ablation"] = time.perf_counter() - t

    t = time.perf_counter()
    probe_idx = probe_fit_indices(eval_indices, train_indices, probe_molecules, seed)
    probe = (
        collect(model, mols, probe_idx, gradients=False, progress=bar, desc="probe features (train)", **common)
        if len(probe_idx) >= 2
        else None
    )
    probe_scored = len(usage.held_out_positions(eval_indices, probe_idx)) if probe is not None else 0
    timings["probe_usage"] = time.perf_counter() - t

    # Forces: where the structures carry them and the model computes them, on the ablation subset.
    t = time.perf_counter()
    forces = None
    with_forces = analyse_forces if analyse_forces is not None else FORCES in mols.atom_properties and model.supports_forces
    if with_forces:
        if FORCES not in mols.atom_properties:
            raise IrrepscopeError("the analysed structures carry no forces")
        if not model.supports_forces:
            raise IrrepscopeError(f"this {model.family} model does not compute forces")
        forces = force_pass(model, mols, eval_indices[abl_pos], orders, batch_size, bar)
        timings["force_ablations"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = usage.usage_rows(
        ev, all_blocks, probe, threshold=threshold, forces=forces, resamples=resamples, level=level, seed=seed,
    )  # fmt: skip
    paths = model.path_weight_rms(ev.path_moment, ev.num_edges)
    timings["probe_usage"] += time.perf_counter() - t
    t = time.perf_counter()
    err = usage.errors(ev.prediction, ev.target)
    base_err = np.abs(baseline_residuals(mols, train_indices, eval_indices, target))
    boot = Resampler(len(err), resamples, seed, level)  # the molecules' resamples of usage_rows: paired with them
    intervals = {
        "model_mae": boot.ratio(err),
        "baseline_mae": boot.ratio(base_err),
        "mae_ratio_to_baseline": boot.ratio(err, base_err),
        "ablation_model_mae": usage.ablation_resampler(boot, len(abl_pos), resamples, seed, level).ratio(err[abl_pos]),
    }
    if forces is not None:
        fboot = Resampler(len(forces.indices), resamples, seed + 3, level)
        intervals["force_mae"] = fboot.ratio(forces.error_abs, 3.0 * forces.atoms)
        intervals["force_baseline_mae"] = fboot.ratio(forces.label_abs, 3.0 * forces.atoms)
    timings["intervals"] = time.perf_counter() - t

    t = time.perf_counter()
    map_pos = _subset(len(eval_indices), map_molecules, seed)
    known = mols.properties.get(SMILES)  # QM9's; structures from files have none (no spatial scores then)
    smiles = [known[i] if known is not None else "" for i in eval_indices[map_pos]]
    colours = complexity.spatial_scores(smiles, bar(smiles, len(smiles), "spatial score"))
    timings["complexity"] = time.perf_counter() - t

    t = time.perf_counter()
    last = {l: ev.graph_invariants[-1][l][map_pos] for l in orders}
    maps = latent.latent_maps(last, usage.invariant(ev.target[map_pos]), embedding, seed, progress=bar)
    timings["maps"] = time.perf_counter() - t

    model_mae = usage.mae(ev.prediction, ev.target)
    baseline = baseline_errors(mols, train_indices, eval_indices, target)
    baseline_mae = baseline["baseline_mae_ev"]
    ratio = model_mae / baseline_mae if baseline_mae > 0 else math.nan
    unused, suggested = usage.decide_orders(model.orders, rows)
    uncertain = usage.uncertain_orders(rows)
    return {
        "target": target,
        "unit": unit_of(target),
        "n_molecules": int(len(eval_indices)),
        "model_mae": model_mae,
        "model_rmse": float(np.sqrt(np.mean((ev.prediction - ev.target) ** 2))),
        "baseline_mae": baseline_mae,
        "baseline_rmse": baseline["baseline_rmse_ev"],
        "mae_ratio_to_baseline": ratio,
        "beats_baseline": bool(ratio <= usage.LEARNED_RATIO),
        "baseline_name": baseline_name(target),
        "baseline_rule": f"{baseline_rule(target)}; "
        f"the model has learned beyond composition when its MAE <= {usage.LEARNED_RATIO} x the baseline's",
        "orders": list(model.orders),
        "analysed_orders": orders,
        "unused_orders": unused,
        "uncertain_orders": uncertain,
        "suggested_orders": suggested,
        "threshold": threshold,
        "threshold_ev": threshold * ablation_mae,
        "threshold_rule": "unused if zeroing the order after every block raises the MAE by less than threshold x the "
        "model's MAE, both on the same ablation_molecules molecules (ablation_model_mae; threshold_ev = threshold x it), "
        f"for the whole {level:.0%} interval of that ratio (ablation_delta_rel_lo/hi); used if the whole interval is "
        "at or above it; otherwise uncertain (and not pruned)",
        "interval_level": level,
        "interval_resamples": resamples,
        "interval_seed": seed,
        "interval_rule": f"{level:.0%} percentile intervals (x_lo, x_hi) of a paired bootstrap over the analysed "
        f"structures ({resamples} resamples, seeded): a model and its ablations on the same resampled structures",
        "intervals": {k: list(v) for k, v in intervals.items()},
        "ablation_model_mae": ablation_mae,
        "embedding": embedding,
        "map_molecules": int(len(map_pos)),
        "probe_molecules": int(len(probe_idx)),
        "probe_scored_molecules": int(probe_scored),
        "probe_rule": "ridge probe fit on probe_molecules molecules of the training split, R^2 on the "
        "probe_scored_molecules analysed molecules it was not fit on (with --split train: the rest of the analysed ones)",
        "ablation_molecules": int(len(abl_pos)),
        **(_force_summary(forces) if forces is not None else {}),
        "num_blocks": model.num_blocks,
        "family": model.family,
        "rows": rows,
        "paths": paths,
        "maps": {name: {**m["scores"], "n": int(len(map_pos))} for name, m in maps.items()},
        "timings_s": timings,
        "_maps": {
            "coords": {name: m["coords"] for name, m in maps.items()},
            "colours": {
                "target": usage.invariant(ev.target[map_pos]),  # a vector's or tensor's length
                "absolute error": np.abs(usage.invariant(ev.prediction - ev.target))[map_pos],
                "heavy atoms": ev.heavy_atoms[map_pos].astype(float),
                **{f"nSPS {k}" if k != "nsps" else "nSPS": v for k, v in colours.items()},
            },
        },
    }
