"""The usage table: per block and per order, how much the trained model relies on that order.

Measures (one row per block and order, plus one ``block = "all"`` row per order):

* ``norm_share_node`` / ``norm_share_graph``: fraction of the block's squared feature norm
  (over *all* of the model's orders, whatever subset is analysed) carried by the order,
  summed over the split's atoms (node features) or molecules (sum-pooled graph features).
  Large does not mean used: the readout may ignore it.
* ``ablation_delta_mae_ev``: MAE with the order's features zeroed after that block minus
  the model's MAE (target unit, eV for energies). The ``all`` row zeroes it after every
  block. This is the primary measure.
* ``grad_x_input``: per atom, ``sum_u |<dpred/dx_u, x_u>|`` over the order's copies ``u``
  (inner product over the 2l+1 components: rotation invariant, the first-order estimate of
  zeroing that copy), averaged over atoms.
* ``probe_r2``: R^2 of a ridge probe of the target (its length, for a vector or tensor) from the order's invariant graph
  features at that block, fit on (a subset of) the training split and scored only on
  evaluated molecules it was not fit on (when the evaluated split is the training split,
  the molecules it was fit on are left out of the scoring: no leakage).
* ``ablation_delta_rel``: that ΔMAE over the model's MAE on the same molecules.
* ``verdict``: from the bootstrap interval of ``ablation_delta_rel`` (below): ``unused``
  when the whole interval lies below ``THRESHOLD``, ``used`` when it lies at or above it,
  ``uncertain`` otherwise (the sample of molecules cannot tell); the MAE is the model's *on
  the molecules the effect was measured on* (the ablation subset, the same for the
  per-block and the ``all`` rows and for ``grad_x_input``); the ``all`` row's verdict
  decides the order's fate; ``absent`` where a block puts out no such order (NaN measures).

Every measure ``x`` has a 95 % interval ``x_lo``, ``x_hi``: the percentile interval of a
paired bootstrap over the molecules it was measured on (:mod:`~irrepscope.analysis.bootstrap`).

With forces (structures that carry them, a model that computes them):
``force_delta_mae`` is the force MAE per component (eV/Å) with the order zeroed after
that block (or every block) minus the model's force MAE, on the force ablation's
structures, recomputed through the hooked model; ``force_delta_rel`` is that over the
model's force MAE there, and ``force_verdict`` compares its interval with ``THRESHOLD``. An order is unused (``decide_orders``) only
when it is unused for the energies and for the forces. Beside them, measures against the
model itself that need no labels (the ones a pretrained potential is judged by):
``energy_change_per_atom``, the mean |ΔE| per atom (eV/atom), ``force_change``, the mean
|ΔF| per component (eV/Å), and ``force_change_rel``, that divided by the model's own mean
|F|, all between the ablated and the unablated model on the same structures.

Path weights: for every tensor-product path (l_in x l_edge -> l_out), the RMS of the
per-edge weights the radial MLP produces over the evaluated edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from irrepscope.analysis.bootstrap import LEVEL, RESAMPLES, Resampler, interval_verdict
from irrepscope.analysis.features import SplitPass
from irrepscope.analysis.force_usage import ForcePass
from irrepscope.errors import IrrepscopeError

# An order is unused when zeroing it in every block raises the MAE by less than 1 % of
# the model's MAE (a change the size of run-to-run noise; a negative change, i.e. the
# model gets better without it, is also "unused").
THRESHOLD = 0.01

# A model "has learned beyond composition" when its MAE is at most this fraction of the
# composition baseline's on the same molecules; otherwise the report's first sentence says
# that its usage verdicts describe a model that only counts atoms.
LEARNED_RATIO = 0.5



def with_bounds(names: list[str]) -> list[str]:
    """Each measure followed by its interval's bounds: ``x, x_lo, x_hi``."""
    return [f for n in names for f in (n, f"{n}_lo", f"{n}_hi")]


ENERGY_MEASURES = ["norm_share_node", "norm_share_graph", "ablation_delta_mae_ev", "ablation_delta_rel", "grad_x_input", "probe_r2"]
LABEL_FREE_MEASURES = ["energy_change_per_atom", "force_change", "force_change_rel"]
FORCE_MEASURES = ["force_delta_mae", "force_delta_rel", *LABEL_FREE_MEASURES]
FIELDS = [
    "block",
    "order",
    *with_bounds(ENERGY_MEASURES),
    "verdict",
    *with_bounds(FORCE_MEASURES[:2]),
    "force_verdict",
    *with_bounds(LABEL_FREE_MEASURES),
]
MEASURES = with_bounds(ENERGY_MEASURES)  # the numeric per-row measures of the energy
FORCE_FIELDS = FIELDS[FIELDS.index("force_delta_mae") :]  # filled where the forces were analysed


def check_threshold(value: Any, name: str = "threshold") -> float:
    """A verdict threshold must be a finite number >= 0: NaN or a negative one would silently call every order unused."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise IrrepscopeError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_count(value: Any, name: str) -> int | None:
    """A molecule count or batch size: None (all), or a positive integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise IrrepscopeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def invariant(values: np.ndarray) -> np.ndarray:
    """A target as rotation-invariant numbers: itself for a scalar, its length for a vector or tensor ``[M, k]``.

    What the probes (from invariant features) and the map colours use.
    """
    values = np.asarray(values)
    return np.linalg.norm(values, axis=1) if values.ndim == 2 else values


def mae(prediction: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error; for vectors and tensors ``[M, k]`` the mean length of the error vector (rotation invariant)."""
    return float(np.mean(invariant(np.abs(np.asarray(prediction) - np.asarray(target)))))


def verdict(lo: float, hi: float, threshold: float = THRESHOLD) -> str:
    """From the interval of a relative ΔMAE (ΔMAE / MAE): ``unused`` when it lies wholly below ``threshold``,
    ``used`` when wholly at or above it, else ``uncertain`` (a point estimate is an interval of zero width)."""
    return interval_verdict(lo, hi, threshold)


def probe_predictions(train_features: np.ndarray, train_target: np.ndarray, eval_features: np.ndarray) -> np.ndarray | None:
    """A ridge probe's (standardised features, alpha 1e-3) predictions on ``eval_features``, fit on the training set.

    None when either set has fewer than two molecules.
    """
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_target) < 2 or len(eval_features) < 2:
        return None
    probe = make_pipeline(StandardScaler(), Ridge(alpha=1e-3))
    probe.fit(train_features, train_target)
    return probe.predict(eval_features)


def probe_r2(
    train_features: np.ndarray, train_target: np.ndarray, eval_features: np.ndarray, eval_target: np.ndarray
) -> float:
    """R^2 on the evaluation set of a ridge probe (:func:`probe_predictions`) fit on the training set."""
    fitted = probe_predictions(train_features, train_target, eval_features)
    return float("nan") if fitted is None else _r2(np.asarray(eval_target, dtype=np.float64), fitted)


def held_out_positions(eval_indices: np.ndarray, fit_indices: np.ndarray) -> np.ndarray:
    """Positions in ``eval_indices`` of the molecules not in ``fit_indices``: where a probe fit on those may be scored."""
    return np.flatnonzero(~np.isin(eval_indices, fit_indices))


def usage_rows(
    eval_pass: SplitPass,
    all_blocks: dict[int, np.ndarray],
    probe_pass: SplitPass | None,
    threshold: float = THRESHOLD,
    *,
    forces: ForcePass | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The rows of usage.csv from an evaluated pass (with gradients), all-blocks ablations and a training pass.

    The ablations are measured on the molecules of ``eval_pass.gradient_positions`` (the
    ablation subset; all of them by default): the per-block ones and ``grad_x_input`` from
    the pass, and ``all_blocks``, order -> the predictions with the order zeroed after
    every block, on those same molecules; every verdict compares a ΔMAE with
    ``threshold`` x the model's MAE there. The norm shares are over all evaluated molecules.
    The probes are fit on ``probe_pass`` and scored on the evaluated molecules that are
    not in it (NaN when fewer than two are left). Every measure has a ``_lo`` / ``_hi``
    bootstrap interval at ``level`` (:mod:`~irrepscope.analysis.bootstrap`; ``resamples``
    resamples, seeded): one resampler per set of molecules (the evaluated ones, the
    ablation subset, the probe's scored ones, the force structures), shared by every
    number on that set, so that a model and its ablations are always compared on the same
    resampled molecules. Verdicts come from the intervals of the relative ΔMAE (:func:`verdict`).
    """
    if eval_pass.target is None or eval_pass.ablation_prediction is None or eval_pass.grad_x_input is None:
        raise IrrepscopeError("usage needs a pass with targets and gradients")
    err = errors(eval_pass.prediction, eval_pass.target)
    boot = Resampler(len(err), resamples, seed, level)
    pos = eval_pass.gradient_positions
    sub_err, sub_target = err[pos], eval_pass.target[pos]
    sub_boot = ablation_resampler(boot, len(pos), resamples, seed, level)
    for l, ablated in all_blocks.items():
        if len(ablated) != len(pos):
            raise IrrepscopeError(f"the all-blocks ablation of l={l} has {len(ablated)} molecules, the ablation subset {len(pos)}")
    probing = probe_pass is not None and probe_pass.target is not None
    scored = held_out_positions(eval_pass.indices, probe_pass.indices) if probing else np.zeros(0, dtype=np.int64)
    probe_boot = Resampler(len(scored), resamples, seed + 2, level) if len(scored) >= 2 else None
    truth = invariant(eval_pass.target[scored]).astype(np.float64) if probing else None  # the probes' scored targets
    sub_atoms = eval_pass.atoms[pos].astype(np.float64)
    fboot = Resampler(len(forces.indices), resamples, seed + 3, level) if forces is not None else None
    rows: list[dict[str, Any]] = []
    nb = eval_pass.node_sq.shape[0]
    for b in range(nb):
        for j, l in enumerate(eval_pass.orders):
            # One dict per row, filled in place: the intervals are queued on it and filled by resolve() below.
            row: dict[str, Any] = {"block": b + 1, "order": l, **{k: float("nan") for k in MEASURES}}
            rows.append(row)
            if eval_pass.graph_invariants[b][l].shape[1] == 0:
                # This block puts out no order l (e.g. a NequIP last layer of scalars only).
                row["verdict"] = "absent"
                force_columns(row, forces, b, l, fboot)
                continue
            measure(row, "norm_share_node", boot, eval_pass.node_sq[b, j], eval_pass.node_sq_total[b])
            measure(row, "norm_share_graph", boot, eval_pass.graph_sq[b, j], eval_pass.graph_sq_total[b])
            _ablation(row, sub_err, errors(eval_pass.ablation_prediction[b, j], sub_target), sub_boot)
            measure(row, "grad_x_input", sub_boot, eval_pass.grad_x_input[b, j], sub_atoms)
            if probing:
                fitted = probe_predictions(
                    probe_pass.graph_invariants[b][l], invariant(probe_pass.target), eval_pass.graph_invariants[b][l][scored]
                )
                if fitted is not None:
                    row["probe_r2"] = _r2(truth, fitted)
                    probe_boot.defer_r2(row, "probe_r2", truth, fitted)
            row["verdict"] = ""  # from the interval, below
            force_columns(row, forces, b, l, fboot)
    for l in eval_pass.orders:
        row = {"block": "all", "order": l, **{k: float("nan") for k in MEASURES}}
        rows.append(row)
        _ablation(row, sub_err, errors(all_blocks[l], sub_target), sub_boot)
        row["verdict"] = ""
        force_columns(row, forces, None, l, fboot)
    for resampler in {id(r): r for r in (boot, sub_boot, probe_boot, fboot) if r is not None}.values():
        resampler.resolve()
    _verdicts(rows, threshold, forces is not None and forces.labelled)
    return rows


def ablation_resampler(boot: Resampler, n: int, resamples: int, seed: int, level: float) -> Resampler:
    """The resampler of the ablation subset of ``n`` molecules: the evaluated molecules' own ``boot`` when the
    subset is all of them (so that its numbers pair with theirs), else one of its own (seed + 1)."""
    return boot if n == boot.n else Resampler(n, resamples, seed + 1, level)


def errors(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per molecule |prediction - target| ([M]); for vectors and tensors the length of the error vector."""
    return invariant(np.abs(np.asarray(prediction) - np.asarray(target)))


def measure(row: dict[str, Any], name: str, boot: Resampler, numerator: np.ndarray, denominator: np.ndarray | None = None) -> None:
    """``row[name]`` = sum(numerator) / sum(denominator) (a mean without one); its bootstrap interval is queued on
    ``boot`` (:meth:`Resampler.resolve` fills ``{name}_lo`` / ``{name}_hi`` in)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    den = float(np.sum(denominator)) if denominator is not None else float(len(numerator))
    row[name] = float(numerator.sum() / den) if den != 0 else float("nan")
    row[f"{name}_lo"] = row[f"{name}_hi"] = float("nan")
    boot.defer(row, name, numerator, denominator)


def _ablation(row: dict[str, Any], err: np.ndarray, ablated: np.ndarray, boot: Resampler) -> None:
    """ΔMAE (target unit) and ΔMAE / MAE of an ablation, paired per molecule, into ``row`` (intervals queued on ``boot``)."""
    measure(row, "ablation_delta_mae_ev", boot, ablated - err)
    measure(row, "ablation_delta_rel", boot, ablated - err, err)


def _verdicts(rows: list[dict[str, Any]], threshold: float, labelled: bool) -> None:  # after resolve()
    """Each row's verdicts from its (resolved) intervals of ΔMAE / MAE; absent rows keep theirs."""
    for row in rows:
        if row.get("verdict") != "absent":
            row["verdict"] = verdict(row["ablation_delta_rel_lo"], row["ablation_delta_rel_hi"], threshold)
        if labelled:
            row["force_verdict"] = verdict(row["force_delta_rel_lo"], row["force_delta_rel_hi"], threshold)


def _r2(truth: np.ndarray, prediction: np.ndarray) -> float:
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    return 1.0 - float(np.sum((truth - prediction) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def force_columns(row: dict[str, Any], forces: ForcePass | None, block: int | None, l: int, boot: Resampler | None) -> None:
    """The force columns of ``row``: ΔMAE against the labels and the label-free changes, their intervals queued on
    ``boot`` (a resampler of ``forces``' structures); NaN without forces. ``force_verdict`` is set by the caller."""
    row.update({f: float("nan") for f in with_bounds(FORCE_MEASURES)})
    row["force_verdict"] = ""
    if forces is None:
        return
    for name in FORCE_MEASURES:
        terms = forces.terms(name, block, l)
        if terms is not None:
            measure(row, name, boot, *terms)


def decide_orders(model_orders: list[int], rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(unused orders, suggested order list) from the ``all`` rows; order 0 is always kept.

    Where the forces were analysed, an order must be unused for both energies and forces.
    """
    unused = sorted(
        r["order"] for r in rows
        if r["block"] == "all" and r["verdict"] == "unused" and r.get("force_verdict", "") in ("", "unused") and r["order"] != 0
    )  # fmt: skip
    suggested = [l for l in model_orders if l == 0 or l not in unused]
    return unused, suggested


def uncertain_orders(rows: list[dict[str, Any]]) -> list[int]:
    """Orders (never 0) whose ``all`` row is ``uncertain`` for the energies or the forces and used for neither:
    the interval straddles the threshold, so they are kept, and a prune says so."""
    return sorted(
        r["order"] for r in rows
        if r["block"] == "all" and r["order"] != 0 and "uncertain" in (r["verdict"], r.get("force_verdict", ""))
        and "used" not in (r["verdict"], r.get("force_verdict", ""))
    )  # fmt: skip
