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
* ``verdict``: ``unused`` when the ablation effect is below ``THRESHOLD`` x the model's
  MAE *on the molecules the effect was measured on* (the whole evaluated split for the
  per-block rows, the all-blocks ablation's subset for the ``all`` rows), else ``used``;
  the ``all`` row's verdict decides the order's fate; ``absent`` where a block puts out no
  such order (its measures are NaN).

With forces (structures that carry them, a model that computes them):
``force_delta_mae`` is the force MAE per component (eV/Å) with the order zeroed after
that block (or every block) minus the model's force MAE, on the force ablation's
structures, recomputed through the hooked model; ``force_verdict`` compares it with
``THRESHOLD`` x the model's force MAE there. An order is unused (``decide_orders``) only
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

FIELDS = [
    "block",
    "order",
    "norm_share_node",
    "norm_share_graph",
    "ablation_delta_mae_ev",
    "grad_x_input",
    "probe_r2",
    "verdict",
    "force_delta_mae",
    "force_verdict",
    "energy_change_per_atom",
    "force_change",
    "force_change_rel",
]
MEASURES = FIELDS[2:7]  # the numeric per-row measures of the energy
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


def verdict(delta_mae: float, model_mae: float, threshold: float = THRESHOLD) -> str:
    """``used`` when zeroing raises the MAE by at least ``threshold`` x the model's MAE."""
    return "used" if delta_mae >= threshold * model_mae else "unused"


def probe_r2(
    train_features: np.ndarray, train_target: np.ndarray, eval_features: np.ndarray, eval_target: np.ndarray
) -> float:
    """R^2 on the evaluation set of a ridge probe (standardised features, alpha 1e-3) fit on the training set."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(train_target) < 2 or len(eval_target) < 2:
        return float("nan")
    probe = make_pipeline(StandardScaler(), Ridge(alpha=1e-3))
    probe.fit(train_features, train_target)
    return float(r2_score(eval_target, probe.predict(eval_features)))


def held_out_positions(eval_indices: np.ndarray, fit_indices: np.ndarray) -> np.ndarray:
    """Positions in ``eval_indices`` of the molecules not in ``fit_indices``: where a probe fit on those may be scored."""
    return np.flatnonzero(~np.isin(eval_indices, fit_indices))


def usage_rows(
    eval_pass: SplitPass,
    all_blocks: dict[int, float],
    probe_pass: SplitPass | None,
    threshold: float = THRESHOLD,
    *,
    all_blocks_mae: float,
    forces: ForcePass | None = None,
) -> list[dict[str, Any]]:
    """The rows of usage.csv from an evaluated pass (with gradients), all-blocks deltas and a training pass.

    ``all_blocks`` maps order -> delta MAE when zeroed after every block, measured on a
    subset of the evaluated molecules on which the model's MAE is ``all_blocks_mae``: the
    ``all`` verdicts compare the delta with ``threshold`` x that MAE (like with like).
    The probes are fit on ``probe_pass`` and scored on the evaluated molecules that are
    not in it (NaN when fewer than two are left).
    """
    if eval_pass.target is None or eval_pass.ablation_prediction is None or eval_pass.grad_x_input is None:
        raise IrrepscopeError("usage needs a pass with targets and gradients")
    base = mae(eval_pass.prediction, eval_pass.target)
    probing = probe_pass is not None and probe_pass.target is not None
    scored = held_out_positions(eval_pass.indices, probe_pass.indices) if probing else np.zeros(0, dtype=np.int64)
    rows: list[dict[str, Any]] = []
    nb = eval_pass.node_sq.shape[0]
    for b in range(nb):
        node_tot = eval_pass.node_sq_total[b]
        graph_tot = eval_pass.graph_sq_total[b]
        for j, l in enumerate(eval_pass.orders):
            if eval_pass.graph_invariants[b][l].shape[1] == 0:
                # This block puts out no order l (e.g. a NequIP last layer of scalars only).
                rows.append(
                    {"block": b + 1, "order": l, **{k: float("nan") for k in MEASURES}, "verdict": "absent",
                     **_force_columns(forces, b, l, threshold)}
                )  # fmt: skip
                continue
            delta = mae(eval_pass.ablation_prediction[b, j], eval_pass.target) - base
            r2 = float("nan")
            if probing:
                r2 = probe_r2(
                    probe_pass.graph_invariants[b][l],
                    invariant(probe_pass.target),
                    eval_pass.graph_invariants[b][l][scored],
                    invariant(eval_pass.target[scored]),
                )
            rows.append(
                {
                    "block": b + 1,
                    "order": l,
                    "norm_share_node": float(eval_pass.node_sq[b, j] / node_tot) if node_tot > 0 else float("nan"),
                    "norm_share_graph": float(eval_pass.graph_sq[b, j] / graph_tot) if graph_tot > 0 else float("nan"),
                    "ablation_delta_mae_ev": float(delta),
                    "grad_x_input": float(eval_pass.grad_x_input[b, j] / max(eval_pass.num_atoms, 1)),
                    "probe_r2": r2,
                    "verdict": verdict(delta, base, threshold),
                    **_force_columns(forces, b, l, threshold),
                }
            )
    for l in eval_pass.orders:
        delta = float(all_blocks[l])
        rows.append(
            {
                "block": "all",
                "order": l,
                "norm_share_node": float("nan"),
                "norm_share_graph": float("nan"),
                "ablation_delta_mae_ev": delta,
                "grad_x_input": float("nan"),
                "probe_r2": float("nan"),
                "verdict": verdict(delta, all_blocks_mae, threshold),
                **_force_columns(forces, None, l, threshold),
            }
        )
    return rows


def _force_columns(forces: ForcePass | None, block: int | None, l: int, threshold: float) -> dict[str, Any]:
    """The force columns of a row: ΔMAE against the labels and the label-free changes (NaN without a force pass)."""
    nan = float("nan")
    if forces is None:
        return {"force_delta_mae": nan, "force_verdict": "", "energy_change_per_atom": nan, "force_change": nan,
                "force_change_rel": nan}  # fmt: skip
    delta = forces.delta(block, l)
    change = forces.force_change(block, l)
    return {
        "force_delta_mae": delta,
        "force_verdict": "absent" if np.isnan(delta) else verdict(delta, forces.force_mae, threshold),
        "energy_change_per_atom": forces.energy_change(block, l),
        "force_change": change,
        "force_change_rel": change / forces.mean_force() if forces.mean_force() > 0 else nan,
    }


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
