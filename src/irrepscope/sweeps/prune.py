"""Pruning: drop the orders a trained model does not use, retrain with the same budget, compare.

The verdicts come from the run's analysis (``RUN_DIR/analysis/usage.json``, written by
``irrepscope analyze``; run first when missing). Order 0 always stays: the readout of a
scalar target reads only the l = 0 features.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from irrepscope.analysis.bootstrap import interval_verdict
from irrepscope.analysis.usage import check_threshold
from irrepscope.atomic import atomic_write_json, atomic_write_text, recover_directory, replace_directory, staging_directory
from irrepscope.config import Config
from irrepscope.errors import IrrepscopeError
from irrepscope.orders import validate_orders
from irrepscope.training.runs import RunDir


def pruned_orders(orders: list[int], unused: list[int]) -> list[int]:
    """``orders`` without the ``unused`` ones; 0 is never removed and the result is a valid order list."""
    orders = validate_orders(orders)
    unknown = sorted(set(unused) - set(orders))
    if unknown:
        raise IrrepscopeError(f"cannot prune orders {unknown}: the model has only {orders}")
    return validate_orders([l for l in orders if l == 0 or l not in set(unused)])


def usage_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "analysis" / "usage.json"


def read_usage(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``analysis/usage.json`` (``irrepscope prune`` runs the analysis first when it is missing)."""
    path = usage_path(run_dir)
    if not path.is_file():
        raise IrrepscopeError(f"{run_dir} has no analysis/usage.json; run `irrepscope analyze {run_dir}` first")
    try:
        usage = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IrrepscopeError(f"cannot read {path}: {exc}") from None
    if "unused_orders" not in usage:
        raise IrrepscopeError(f"{path} has no 'unused_orders'; re-run `irrepscope analyze {run_dir}`")
    return usage


def _relative_effects(usage: dict[str, Any], row: dict[str, Any]) -> list[float]:
    """An all-blocks row's MAE increases relative to the model's MAE on the same structures: energy, and forces if analysed.

    Like with like: the all-blocks ablation is measured on a subset, against the model's MAE on that subset.
    """
    effects = [row["ablation_delta_mae_ev"] / usage.get("ablation_model_mae", usage["model_mae"])]
    if usage.get("force_mae") and row.get("force_delta_mae") is not None:
        effects.append(row["force_delta_mae"] / usage["force_mae"])
    return effects


def _relative_intervals(usage: dict[str, Any], row: dict[str, Any]) -> list[tuple[float, float]]:
    """The (lo, hi) intervals of those relative increases; for an analysis made before the intervals, the points."""
    if row.get("ablation_delta_rel_lo") is None:
        return [(e, e) for e in _relative_effects(usage, row)]
    out = [(row["ablation_delta_rel_lo"], row["ablation_delta_rel_hi"])]
    if usage.get("force_mae") and row.get("force_delta_rel_lo") is not None:
        out.append((row["force_delta_rel_lo"], row["force_delta_rel_hi"]))
    return out


def decide_at(usage: dict[str, Any], threshold: float) -> tuple[list[int], list[int]]:
    """(unused, uncertain) orders (never 0) at ``threshold``, from the intervals of the all-blocks rows.

    Unused: every interval (energy, and forces where analysed) lies below ``threshold`` x the
    model's MAE; uncertain: none lies at or above it but some straddles it (kept, and said).
    """
    threshold = check_threshold(threshold)
    unused, uncertain = [], []
    for r in usage["rows"]:
        if r["block"] != "all" or int(r["order"]) == 0:
            continue
        verdicts = {interval_verdict(lo, hi, threshold) for lo, hi in _relative_intervals(usage, r)}
        if verdicts == {"unused"}:
            unused.append(int(r["order"]))
        elif "used" not in verdicts and "uncertain" in verdicts:
            uncertain.append(int(r["order"]))
    return sorted(unused), sorted(uncertain)


def unused_at(usage: dict[str, Any], threshold: float) -> list[int]:
    """Orders (never 0) whose all-blocks ablation raises the MAE by less than ``threshold`` x the model's MAE there,
    for the whole interval (:func:`decide_at`); with forces, the force MAE's too."""
    return decide_at(usage, threshold)[0]


def least_used(usage: dict[str, Any]) -> list[int]:
    """The one order (never 0) whose removal after every block raises the MAE least: what to prune first.

    With forces, "least" is the smaller of the two relative increases' maximum (energy and forces).
    """
    rows = [r for r in usage["rows"] if r["block"] == "all" and int(r["order"]) != 0 and r["ablation_delta_mae_ev"] is not None]
    if not rows:
        raise IrrepscopeError("the model has no order besides 0 to prune")
    if not usage.get("force_mae"):  # energies only: the smallest increase (the same ranking as relative to the MAE)
        return [int(min(rows, key=lambda r: r["ablation_delta_mae_ev"])["order"])]
    return [int(min(rows, key=lambda r: max(_relative_effects(usage, r)))["order"])]


def pruned_config(run_dir: str | Path, usage: dict[str, Any]) -> Config:
    """The run's own config (same budget, seed and split) with the unused orders removed."""
    config = RunDir.at(run_dir).load_config()
    pruned = copy.deepcopy(config)
    pruned.model.orders = pruned_orders(config.model.orders, [int(l) for l in usage["unused_orders"]])
    return pruned.validate()


def usage_is_current(run_dir: str | Path, usage: dict[str, Any]) -> bool:
    """Whether an analysis was made from the files the run holds now (its best.pt, split, composition)."""
    try:
        RunDir.at(run_dir).check_pins(usage.get("pins"), usage_path(run_dir), "irrepscope analyze")
    except IrrepscopeError:
        return False
    return True


def analysis_problem(run_dir: str | Path, usage: dict[str, Any]) -> str | None:
    """Why an analysis cannot decide what to prune (None when it can).

    Pruning acts on the verdicts of the run's own best.pt on its own test split, with every
    order analysed, made from the files the run holds now.
    """
    run = RunDir.at(run_dir)
    orders = run.load_config().model.orders
    if usage.get("split", "test") != "test":
        return f"it analysed the {usage.get('split')} split, not the test split"
    if usage.get("checkpoint", "best") != "best":
        return f"it analysed {usage.get('checkpoint')}.pt, not best.pt"
    analysed = usage.get("analysed_orders", usage.get("orders"))
    if analysed is None or sorted(int(l) for l in analysed) != sorted(orders):
        return f"it analysed only orders {analysed} of {orders}"
    if not usage_is_current(run_dir, usage):
        return "it was made from other files than the run holds now (another best.pt or split)"
    return None


def current_usage(run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """The run's analysis if it can decide what to prune, else a fresh one (default settings, test split), saying why."""
    import sys

    from irrepscope.api import analyze_run

    why = "it has none" if not usage_path(run_dir).is_file() else analysis_problem(run_dir, read_usage(run_dir))
    if why is not None:
        print(f"note: analysing {run_dir} first, into its analysis/ ({why})", file=sys.stderr)
        analyze_run(run_dir, embedding="pca", progress=progress)
    return read_usage(run_dir)


def train_pruned(config: Config, out_dir: Path, progress: bool = True) -> str:
    """Train the pruned config into ``out_dir``: afresh, or resumed / kept when ``out_dir`` holds this same run."""
    from irrepscope.config import recipe_differences
    from irrepscope.sweeps.runner import run_state
    from irrepscope.training.trainer import Trainer

    run = RunDir.at(out_dir)
    state = run_state(out_dir, config.train.epochs) if run.config.is_file() else "new"
    if state != "new":
        differ = recipe_differences(run.load_config(), config)
        if differ:
            raise IrrepscopeError(f"{out_dir} holds another run than the pruned config ({', '.join(differ)}); choose another --out")
    if state == "finished":
        return "kept"
    Trainer(config, out_dir, progress=progress).run_training(resume=state == "partial")
    return "resumed" if state == "partial" else "trained"


def comparison(original: str | Path, pruned: str | Path) -> dict[str, Any]:
    """Parameters, test metrics and order usage of the original and the pruned run, side by side."""
    out: dict[str, Any] = {}
    for label, run_dir in (("original", Path(original)), ("pruned", Path(pruned))):
        run = RunDir.at(run_dir)
        test = run.read_test()
        if test is None:
            raise IrrepscopeError(f"{run_dir} has no test.json")
        usage = read_usage(run_dir)
        out[label] = {
            "run": str(run_dir),
            "orders": run.load_config().model.orders,
            "params": test["params"],
            "test_mae_ev": test["mae_ev"],
            "test_rmse_ev": test["rmse_ev"],
            "baseline_mae_ev": test.get("baseline_mae_ev"),
            "unused_orders": usage["unused_orders"],
            "pins": {**run.pins("best")},
        }
    out["params_ratio"] = out["pruned"]["params"] / out["original"]["params"]
    out["test_mae_delta_ev"] = out["pruned"]["test_mae_ev"] - out["original"]["test_mae_ev"]
    return out


def comparison_markdown(comp: dict[str, Any]) -> str:
    o, p = comp["original"], comp["pruned"]
    lines = [
        "| run | orders | params | test MAE (eV) | composition baseline MAE (eV) | test RMSE (eV) | unused orders |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in (("original", o), ("pruned", p)):
        base = "n/a" if r.get("baseline_mae_ev") is None else f"{r['baseline_mae_ev']:.4f}"
        lines.append(
            f"| {label} | {r['orders']} | {r['params']:,} | {r['test_mae_ev']:.4f} | {base} | {r['test_rmse_ev']:.4f} "
            f"| {r['unused_orders']} |"
        )
    return "\n".join(lines) + "\n"


COMPARISON = "comparison"  # PRUNED_RUN/comparison/{comparison.json, comparison.md}: one set, replaced whole


def write_comparison(original: str | Path, pruned: str | Path) -> dict[str, Any]:
    """Write ``comparison/comparison.json`` and ``comparison.md`` into the pruned run's directory, as one set."""
    comp = comparison(original, pruned)
    target = Path(pruned) / COMPARISON
    recover_directory(target)
    staged = staging_directory(target)
    try:
        atomic_write_json(staged / "comparison.json", comp)
        atomic_write_text(staged / "comparison.md", comparison_markdown(comp))
        replace_directory(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return comp
