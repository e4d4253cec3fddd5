"""``irrepscope analyze``: the analysis stages, each with a progress bar, and the files they write.

RUN_DIR/analysis/usage.csv    one row per (block, order) and one ``all`` row per order
RUN_DIR/analysis/usage.json   orders, unused_orders, suggested_orders, threshold, MAE,
                              rows, path weights, map scores, stage timings; also
                              ablation_model_mae (the model's MAE on the all-blocks
                              ablation's subset, which threshold_ev and the verdicts use)
                              and probe_scored_molecules (the held-out molecules the
                              probes are scored on)
RUN_DIR/analysis/*.png        usage heat maps, path-weight heat maps, latent maps
RUN_DIR/analysis/report.html  self-contained report (images embedded)
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irrepscope.analysis import complexity, latent, usage
from irrepscope.analysis.features import SplitPass, all_blocks_ablation, collect, order_removed_models
from irrepscope.atomic import atomic_write_json, atomic_write_text
from irrepscope.data.batching import iterate_batches
from irrepscope.data.composition import fit_composition
from irrepscope.data.qm9 import PROPERTIES, Molecules
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import EquivariantGraphConv

SPLITS = ("test", "val", "train")
MAP_MOLECULES = 2000  # PHATE on 13k points takes minutes; maps use a seeded subset (--map-molecules)
# The all-blocks ablation re-runs 4 of 5 blocks once per order; it is a paired comparison
# (same molecules with and without the order), so a seeded subset measures it tightly.
ABLATION_MOLECULES = 4000
PROBE_MOLECULES = 2000  # the probe is fit on this many molecules of the training split


def _bar(enabled: bool):
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


def analyze_model(
    model: EquivariantGraphConv,
    mols: Molecules,
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
    batch_size: int = 256,
    seed: int = 0,
    threshold: float = usage.THRESHOLD,
    progress: bool = True,
) -> dict[str, Any]:
    """Every analysis stage on ``mols[eval_indices]``; returns the usage.json content plus map arrays (key ``_maps``).

    The probes are fit on training molecules (:func:`probe_fit_indices`) and always scored
    on analysed molecules they were not fit on, also when ``eval_indices`` are training
    molecules. The all-blocks verdicts use the model's MAE on the all-blocks ablation's
    subset (``ablation_model_mae``), the molecules their deltas were measured on.
    """
    orders = check_orders(orders, model.orders)
    if len(eval_indices) == 0:
        raise IrrepscopeError("the split to analyse is empty (check --max-molecules)")
    if embedding not in latent.EMBEDDINGS:
        raise IrrepscopeError(f"unknown embedding {embedding!r}; choose one of {latent.EMBEDDINGS}")
    bar = _bar(progress)
    timings: dict[str, float] = {}
    common = dict(target=target, graph=graph, cutoff=cutoff, orders=orders, batch_size=batch_size)

    t = time.perf_counter()
    ev: SplitPass = collect(model, mols, eval_indices, gradients=True, progress=bar, desc="features+gradients", **common)
    timings["features_gradients"] = time.perf_counter() - t
    if target in mols.properties:
        ev.target = mols.properties[target][eval_indices]  # float64, not the batch's model dtype

    # Zeroing an order after every block cannot be read off one gradient: re-run per order.
    t = time.perf_counter()
    abl_pos = _subset(len(eval_indices), ablation_molecules, seed)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    ablated = {l: [] for l in orders}
    removed = order_removed_models(model, orders)
    batches = iterate_batches(
        mols, eval_indices[abl_pos], batch_size, shuffle=False, target=None, graph=graph, cutoff=cutoff, dtype=dtype
    )
    for batch in bar(batches, math.ceil(len(abl_pos) / batch_size), "all-blocks ablation"):
        for l, p in all_blocks_ablation(model, batch.to(device), orders, removed).items():
            ablated[l].append(p.double().cpu().numpy())
    # The deltas are measured on this subset, so the verdict compares them with the MAE on it.
    ablation_mae = usage.mae(ev.prediction[abl_pos], ev.target[abl_pos])
    all_blocks = {l: usage.mae(np.concatenate(ablated[l]), ev.target[abl_pos]) - ablation_mae for l in orders}
    timings["all_blocks_ablation"] = time.perf_counter() - t

    t = time.perf_counter()
    probe_idx = probe_fit_indices(eval_indices, train_indices, probe_molecules, seed)
    probe = (
        collect(model, mols, probe_idx, gradients=False, progress=bar, desc="probe features (train)", **common)
        if len(probe_idx) >= 2
        else None
    )
    probe_scored = len(usage.held_out_positions(eval_indices, probe_idx)) if probe is not None else 0
    rows = usage.usage_rows(ev, all_blocks, probe, threshold=threshold, all_blocks_mae=ablation_mae)
    paths = usage.path_weight_rms(model, ev)
    timings["probe_usage"] = time.perf_counter() - t

    t = time.perf_counter()
    map_pos = _subset(len(eval_indices), map_molecules, seed)
    smiles = [mols.smiles[i] for i in eval_indices[map_pos]]
    colours = complexity.spatial_scores(smiles, bar(smiles, len(smiles), "spatial score"))
    timings["complexity"] = time.perf_counter() - t

    t = time.perf_counter()
    last = {l: ev.graph_invariants[-1][l][map_pos] for l in orders}
    maps = latent.latent_maps(last, ev.target[map_pos], embedding, seed, progress=bar)
    timings["maps"] = time.perf_counter() - t

    model_mae = usage.mae(ev.prediction, ev.target)
    baseline = fit_composition(mols, train_indices, target).predict(mols, eval_indices)
    baseline_mae = usage.mae(baseline, ev.target)
    ratio = model_mae / baseline_mae if baseline_mae > 0 else math.nan
    unused, suggested = usage.decide_orders(model.orders, rows)
    return {
        "target": target,
        "unit": PROPERTIES[target][0] if target in PROPERTIES else "",
        "n_molecules": int(len(eval_indices)),
        "model_mae": model_mae,
        "model_rmse": float(np.sqrt(np.mean((ev.prediction - ev.target) ** 2))),
        "baseline_mae": baseline_mae,
        "baseline_rmse": float(np.sqrt(np.mean((baseline - ev.target) ** 2))),
        "mae_ratio_to_baseline": ratio,
        "beats_baseline": bool(ratio <= usage.LEARNED_RATIO),
        "baseline_rule": f"composition baseline: least squares on element counts, training split only; "
        f"the model has learned beyond composition when its MAE <= {usage.LEARNED_RATIO} x the baseline's",
        "orders": list(model.orders),
        "analysed_orders": orders,
        "unused_orders": unused,
        "suggested_orders": suggested,
        "threshold": threshold,
        "threshold_ev": threshold * ablation_mae,
        "threshold_rule": "unused if zeroing the order after every block raises the MAE by less than threshold x the "
        "model's MAE, both on the same ablation_molecules molecules (ablation_model_mae; threshold_ev = threshold x it)",
        "ablation_model_mae": ablation_mae,
        "embedding": embedding,
        "map_molecules": int(len(map_pos)),
        "probe_molecules": int(len(probe_idx)),
        "probe_scored_molecules": int(probe_scored),
        "probe_rule": "ridge probe fit on probe_molecules molecules of the training split, R^2 on the "
        "probe_scored_molecules analysed molecules it was not fit on (with --split train: the rest of the analysed ones)",
        "ablation_molecules": int(len(abl_pos)),
        "num_blocks": len(model.blocks),
        "rows": rows,
        "paths": paths,
        "maps": {name: {**m["scores"], "n": int(len(map_pos))} for name, m in maps.items()},
        "timings_s": timings,
        "_maps": {
            "coords": {name: m["coords"] for name, m in maps.items()},
            "colours": {
                "target": ev.target[map_pos],
                "absolute error": np.abs(ev.prediction - ev.target)[map_pos],
                "heavy atoms": ev.heavy_atoms[map_pos].astype(float),
                **{f"nSPS {k}" if k != "nsps" else "nSPS": v for k, v in colours.items()},
            },
        },
    }


def usage_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=usage.FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON for other tools)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def analyze_run(
    run_dir: str | Path,
    split: str = "test",
    max_molecules: int | None = None,
    embedding: str = "phate",
    orders: list[int] | None = None,
    map_molecules: int | None = MAP_MOLECULES,
    probe_molecules: int | None = PROBE_MOLECULES,
    ablation_molecules: int | None = ABLATION_MOLECULES,
    checkpoint: str = "best",
    device: str = "cpu",
    batch_size: int = 256,
    seed: int = 0,
    threshold: float = usage.THRESHOLD,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse a run on its own saved split and write ``RUN_DIR/analysis/``; returns usage.json's content."""
    from irrepscope.data.qm9 import load_qm9
    from irrepscope.data.split import load_split
    from irrepscope.report.analysis import write_analysis_report
    from irrepscope.training.evaluate import model_from_checkpoint, resolve_device
    from irrepscope.training.runs import RunDir

    if split not in SPLITS:
        raise IrrepscopeError(f"unknown split {split!r}; choose one of {SPLITS}")
    if max_molecules is not None and max_molecules < 0:
        raise IrrepscopeError(f"--max-molecules must be >= 0, got {max_molecules}")
    run = RunDir.at(run_dir).require()
    model, config, _ = model_from_checkpoint(run.checkpoint(checkpoint), resolve_device(device))
    check_orders(orders, model.orders)  # fail before loading data
    if not run.split.is_file():
        raise IrrepscopeError(f"{run.root} has no split.json; the analysis needs the run's own split")
    splits = load_split(run.split)
    indices = np.asarray(splits[split], dtype=np.int64)
    if max_molecules is not None:
        # A seeded random subset: QM9 is ordered by size, so the first N of a split are its smallest molecules.
        indices = indices[_subset(len(indices), max_molecules, seed)]
    if len(indices) == 0:
        raise IrrepscopeError(f"the {split} split of {run.root} is empty (after --max-molecules)")
    mols = load_qm9(config.data.cache_dir, progress=False)
    t0 = time.perf_counter()
    with torch.inference_mode(False):
        result = analyze_model(
            model,
            mols,
            indices,
            np.asarray(splits["train"], dtype=np.int64),
            target=config.data.target,
            graph=config.data.graph,
            cutoff=config.model.cutoff,
            orders=orders,
            embedding=embedding,
            map_molecules=map_molecules,
            probe_molecules=probe_molecules,
            ablation_molecules=ablation_molecules,
            batch_size=batch_size,
            seed=seed,
            threshold=threshold,
            progress=progress,
        )
    result = {"run": str(run.root), "split": split, "checkpoint": checkpoint, **result}
    out = run.root / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "usage.csv", usage_csv(result["rows"]))
    t = time.perf_counter()
    test = None
    if run.test.is_file():
        import json

        test = json.loads(run.test.read_text())
    write_analysis_report(out, result, config.to_yaml(), test, progress=progress)
    result["timings_s"]["report"] = time.perf_counter() - t
    result["timings_s"]["total"] = time.perf_counter() - t0
    public = _json_safe({k: v for k, v in result.items() if not k.startswith("_")})
    atomic_write_json(out / "usage.json", public)
    return public
