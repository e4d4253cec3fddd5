"""A potential against itself: which orders carry a model's energies and forces, with no labels needed.

A pretrained universal potential (SevenNet's) was fitted to labels of another level of
theory than any data at hand, so its primary usage measures compare the model with
itself (:mod:`~irrepscope.analysis.force_usage`): zero an order after one block or after
every block, recompute energies and forces through the hooked model, and measure

* ``energy_change_per_atom``: mean over structures of |ΔE| / atoms (eV/atom);
* ``force_change``: mean |ΔF| per component (eV/Å), and ``force_change_rel``, that divided
  by the model's own mean |F| on the same structures.

Every measure has a 95 % bootstrap interval over the structures (``x_lo``, ``x_hi``;
:mod:`~irrepscope.analysis.bootstrap`). Verdict (per row): ``used`` when the interval of
the energy change lies at or above ``ENERGY_THRESHOLD`` per atom or that of the relative
force change at or above ``FORCE_THRESHOLD``; ``unused`` when both lie wholly below;
``uncertain`` otherwise; ``absent`` where the block puts the order out not at all. Where the
structures carry forces, the force ΔMAE against them stands beside (``force_delta_mae``).

Every measure is also given per class of structure (the structures' ``class`` property,
e.g. ``molecule`` or ``ionic crystal``; without one: ``molecule`` or ``crystal`` by
periodicity), since an order a molecule's forces need may not matter to a rattled salt.
Works for any :class:`~irrepscope.analysis.interface.AnalysedModel` that computes forces.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from irrepscope.analysis.force_usage import ForcePass, ablation_cases, force_pass
from irrepscope.analysis.interface import AnalysedModel
from irrepscope.analysis.runner import check_orders, progress_bar
from irrepscope.analysis.bootstrap import LEVEL, RESAMPLES, Resampler, interval
from irrepscope.analysis.usage import LABEL_FREE_MEASURES, check_count, check_threshold, force_columns, with_bounds
from irrepscope.data.structures import CLASS, Structures
from irrepscope.errors import IrrepscopeError

ENERGY_THRESHOLD = 1e-3  # eV/atom: well below the energy errors of universal potentials (tens of meV/atom)
FORCE_THRESHOLD = 0.01  # of the model's mean |F|: the same 1 % as the label-based verdicts
VERDICT_RULE = (
    "used when zeroing the order changes the energy by at least energy_threshold eV/atom (mean |ΔE| per atom) "
    "or the forces by at least force_threshold x the model's mean |F| (mean |ΔF| per component), for the whole "
    "interval of either; unused when both intervals lie wholly below; otherwise uncertain"
)
ROW_FIELDS = ["block", "order", *with_bounds(LABEL_FREE_MEASURES), "verdict", *with_bounds(["force_delta_mae"])]


def structure_classes(structures: Structures, indices: np.ndarray) -> np.ndarray:
    """The class of each of ``structures[indices]``: its ``class`` property where given, else ``molecule`` / ``crystal``."""
    indices = np.asarray(indices, dtype=np.int64)
    by_cell = np.where(structures.periodic[indices], "crystal", "molecule").astype(object)
    if CLASS not in structures.properties:
        return by_cell
    given = np.asarray([str(c) for c in structures.properties[CLASS][indices]], dtype=object)
    return np.where(given != "", given, by_cell)


def self_verdict(
    energy: tuple[float, float], force_rel: tuple[float, float], energy_threshold: float, force_threshold: float
) -> str:
    """The label-free rule (:data:`VERDICT_RULE`) on the (lo, hi) intervals of the energy change per atom and of the
    relative force change; ``absent`` for a case that does not exist. A point value is an interval of zero width."""
    if math.isnan(energy[0]):
        return "absent"
    force_known = not math.isnan(force_rel[0])
    if energy[0] >= energy_threshold or (force_known and force_rel[0] >= force_threshold):
        return "used"
    if energy[1] < energy_threshold and (not force_known or force_rel[1] < force_threshold):
        return "unused"
    return "uncertain"


def _rows(
    forces: ForcePass, model: AnalysedModel, orders: list[int], thresholds: tuple[float, float], boot: Resampler
) -> list[dict[str, Any]]:
    rows = []
    cases = [(b, l) for b in range(model.num_blocks) for l in orders] + [(None, l) for l in orders]
    for block, l in cases:
        row = {"block": "all" if block is None else block + 1, "order": l}
        force_columns(row, forces, block, l, boot)
        rows.append(row)
    boot.resolve()
    keep = with_bounds(LABEL_FREE_MEASURES) + (with_bounds(["force_delta_mae"]) if forces.labelled else [])
    out = []
    for row in rows:
        verdict = self_verdict(
            (row["energy_change_per_atom_lo"], row["energy_change_per_atom_hi"]),
            (row["force_change_rel_lo"], row["force_change_rel_hi"]), *thresholds,
        )  # fmt: skip
        out.append({"block": row["block"], "order": row["order"], **{k: row[k] for k in keep[:9]}, "verdict": verdict,
                    **{k: row[k] for k in keep[9:]}})  # fmt: skip
    return out


def analyze_potential(
    model: AnalysedModel,
    structures: Structures,
    indices: np.ndarray | None = None,
    *,
    orders: list[int] | None = None,
    batch_size: int = 8,
    energy_threshold: float = ENERGY_THRESHOLD,
    force_threshold: float = FORCE_THRESHOLD,
    progress: bool = True,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """Which orders carry ``model``'s energies and forces on ``structures[indices]`` (all: None), measured against itself.

    Intervals: ``level`` percentile intervals of a bootstrap over the structures
    (``resamples`` resamples, seeded), within each class for the per-class rows.

    Returns what ``usage.json`` of a potential analysis holds: the rows (every block and
    order, then ``all``), the same per structure class, the unused orders and the rules.
    """
    energy_threshold = check_threshold(energy_threshold, "energy_threshold")
    force_threshold = check_threshold(force_threshold, "force_threshold")
    for name, value in (("batch_size", batch_size), ("resamples", resamples)):
        if check_count(value, name) is None:
            raise IrrepscopeError(f"{name} must be a positive integer, got None")
    interval(np.zeros(1), level)  # a level outside (0, 1) is an error before any work
    if not model.supports_forces:
        raise IrrepscopeError(f"this {model.family} model does not compute forces: a potential analysis needs them")
    indices = np.arange(len(structures)) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise IrrepscopeError("no structures to analyse")
    orders = check_orders(orders, model.orders)
    t0 = time.perf_counter()
    forces = force_pass(model, structures, indices, orders, batch_size, progress_bar(progress))
    thresholds = (energy_threshold, force_threshold)
    rows = _rows(forces, model, orders, thresholds, Resampler(len(indices), resamples, seed, level))
    classes = structure_classes(structures, indices)
    per_class = []
    for k, name in enumerate(sorted(set(classes))):
        sel = np.flatnonzero(classes == name)
        part = forces.subset(sel)
        boot = Resampler(len(sel), resamples, seed + 1 + k, level)
        per_class.append(
            {
                "class": name,
                "structures": int(len(sel)),
                "atoms": part.num_atoms,
                "mean_force": part.mean_force(),
                "rows": [
                    {k: v for k, v in r.items() if not k.startswith("force_delta")}
                    for r in _rows(part, model, orders, thresholds, boot) if r["block"] == "all"
                ],
            }
        )  # fmt: skip
    unused = sorted(r["order"] for r in rows if r["block"] == "all" and r["verdict"] == "unused" and r["order"] != 0)
    uncertain = sorted(r["order"] for r in rows if r["block"] == "all" and r["verdict"] == "uncertain" and r["order"] != 0)
    result: dict[str, Any] = {
        "kind": "potential",
        "family": model.family,
        "n_structures": int(len(indices)),
        "n_atoms": forces.num_atoms,
        "orders": list(model.orders),
        "analysed_orders": orders,
        "num_blocks": model.num_blocks,
        "block_irreps": [str(i) for i in model.block_irreps],
        "mean_force": forces.mean_force(),
        "energy_threshold": energy_threshold,
        "force_threshold": force_threshold,
        "verdict_rule": VERDICT_RULE,
        "unused_orders": unused,
        "uncertain_orders": uncertain,
        "interval_level": level,
        "interval_resamples": resamples,
        "interval_seed": seed,
        "interval_rule": f"{level:.0%} percentile intervals (x_lo, x_hi) of a bootstrap over the analysed structures "
        f"({resamples} resamples, seeded; per class within the class): the model and its ablations on the same resample",
        "rows": rows,
        "classes": per_class,
        "cases": len(ablation_cases(model, orders)),
    }
    if forces.labelled:
        result.update(
            {
                "force_mae": forces.force_mae,
                "force_baseline_mae": forces.baseline_mae,
                "force_rule": "force MAE per component against the structures' own forces (another level of theory than "
                "a pretrained model's); force_delta_mae: with the order zeroed minus without",
            }
        )
    result["timings_s"] = {"ablations": time.perf_counter() - t0}
    return result


__all__ = ["ENERGY_THRESHOLD", "FORCE_THRESHOLD", "analyze_potential", "self_verdict", "structure_classes"]
