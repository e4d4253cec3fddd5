"""Gather a sweep's runs into results.csv and summarise them per configuration with error bars.

results.csv has one row per run of the sweep, finished or not (its ``status``), so that no
run goes missing silently; the summaries and comparisons use the finished runs only.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from irrepscope.atomic import atomic_write_text
from irrepscope.data.composition import unit_of
from irrepscope.sweeps.prune import read_usage, usage_is_current
from irrepscope.sweeps.runner import run_status
from irrepscope.sweeps.spec import Sweep
from irrepscope.training.runs import RunDir

RESULT_FIELDS = [
    "config", "variant", "target", "orders", "hidden_mul", "params", "seed", "epochs", "train_seconds", "device",
    "reference", "test_mae_ev", "test_rmse_ev", "baseline_mae_ev", "mae_ratio_to_baseline", "test_mae_per_atom_ev",
    "test_force_mae", "force_baseline_mae", "n_test", "best_epoch", "run", "status", "error",
]  # fmt: skip
FORCE_KEYS = {"test_mae_per_atom_ev": "mae_per_atom_ev", "test_force_mae": "force_mae", "force_baseline_mae": "force_baseline_mae"}


def _finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of finished runs (rows without a status, e.g. built by hand, count as finished)."""
    return [r for r in rows if r.get("status", "finished") == "finished"]


def collect_results(sweep: Sweep, out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run: its status, and for a finished run its numbers, read from its own test.json and metrics.csv."""
    rows = []
    for spec in sweep.runs:
        run = RunDir.at(Path(out_dir) / spec.relpath)
        status, error = run_status(run.root, spec.config.train.epochs)
        row: dict[str, Any] = {
            "config": spec.config_name,
            "variant": spec.variant,
            "target": spec.config.data.target,
            "orders": " ".join(map(str, spec.config.model.orders)),
            "hidden_mul": spec.config.model.hidden_mul,
            "seed": spec.seed,
            "run": spec.relpath,
            "status": status,
            "error": error,
        }
        rows.append(row)
        if status != "finished":
            continue
        test = run.read_test()  # refused when made from another best.pt, split or composition
        metrics = run.read_metrics()
        # Runs written before the baseline existed: compute it from the run's own split.
        baseline = test if "baseline_mae_ev" in test else _baseline(run, spec.config.data.target)
        row.update(
            {
                "params": test["params"],
                "epochs": len(metrics),
                "train_seconds": round(sum(float(r["epoch_seconds"]) for r in metrics), 1),
                "device": _devices(metrics, run.load_config().train.device),
                "reference": test.get("reference", "none"),
                "test_mae_ev": test["mae_ev"],
                "test_rmse_ev": test["rmse_ev"],
                "baseline_mae_ev": baseline["baseline_mae_ev"],
                "mae_ratio_to_baseline": test["mae_ev"] / baseline["baseline_mae_ev"],
                **{key: test[name] for key, name in FORCE_KEYS.items() if name in test},
                "n_test": test["n"],
                "best_epoch": test["epoch"],
            }
        )
    return rows


def _devices(metrics: list[dict[str, Any]], recorded: str) -> str:
    """Where a run's epochs ran (its metrics rows; rows written before they said so: the recorded config's)."""
    return "+".join(sorted({r.get("device") or recorded for r in metrics})) or recorded


def _baseline(run: RunDir, target: str) -> dict[str, float]:
    from irrepscope.data.composition import baseline_errors
    from irrepscope.data.sources import load_run_structures
    from irrepscope.data.split import load_split

    structures = load_run_structures(run.load_config().data, run.split)
    split = load_split(run.split, len(structures))
    return baseline_errors(structures, split["train"], split["test"], target)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration variant: mean and sample standard deviation over the finished seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in _finished(rows):
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for variant, items in groups.items():
        mae = np.array([r["test_mae_ev"] for r in items])
        rmse = np.array([r["test_rmse_ev"] for r in items])
        secs = np.array([r["train_seconds"] for r in items])
        base = np.array([r["baseline_mae_ev"] for r in items])
        by_device: dict[str, list[float]] = {}
        for r in items:
            by_device.setdefault(str(r.get("device", "cpu")), []).append(float(r["train_seconds"]))
        out.append(
            {
                "variant": variant,
                "target": items[0].get("target", "U0_atomization"),
                "orders": items[0]["orders"],
                "hidden_mul": items[0]["hidden_mul"],
                "params": items[0]["params"],
                "seeds": len(items),
                "mae_mean": float(mae.mean()),
                "mae_std": float(mae.std(ddof=1)) if len(mae) > 1 else math.nan,
                "baseline_mean": float(base.mean()),
                "baseline_std": float(base.std(ddof=1)) if len(base) > 1 else math.nan,
                "rmse_mean": float(rmse.mean()),
                "rmse_std": float(rmse.std(ddof=1)) if len(rmse) > 1 else math.nan,
                "train_seconds_mean": float(secs.mean()),
                "train_seconds_by_device": {d: (float(np.mean(v)), len(v)) for d, v in sorted(by_device.items())},
                **_force_means(items),
            }
        )
    return sorted(out, key=lambda r: r["mae_mean"])


def _mean_std(values: list[float], name: str) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {f"{name}_mean": float(a.mean()), f"{name}_std": float(a.std(ddof=1)) if len(a) > 1 else math.nan}


def _force_means(items: list[dict[str, Any]]) -> dict[str, float]:
    """Force MAE, zero-force baseline and energy MAE per atom over seeds, when every run of a variant has them."""
    if not all(r.get("test_force_mae") not in (None, "") for r in items):
        return {}
    out: dict[str, float] = {}
    for key, name in (("test_force_mae", "force"), ("force_baseline_mae", "force_baseline"), ("test_mae_per_atom_ev", "per_atom")):
        out.update(_mean_std([float(r[key]) for r in items], name))
    return out


def write_results_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def summary_markdown(name: str, summary: list[dict[str, Any]]) -> str:
    lines = [
        f"# Sweep {name}",
        "",
        "Test error on each run's own held-out split, in the target's unit (eV for energies; per component "
        "for a vector or tensor); mean ± sample standard deviation over seeds. Baseline: the composition "
        "baseline, least squares of the target on element counts, fitted on each run's training split, on the same test molecules "
        "(the zero vector for a vector or tensor target).",
        "",
        "| configuration | target | orders | H | params | seeds | test MAE | baseline MAE | test RMSE | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        unit = f" {unit_of(r['target'])}"
        lines.append(
            f"| {r['variant']} | {r['target']} | [{r['orders'].replace(' ', ',')}] | {r['hidden_mul']} | {r['params']:,} "
            f"| {r['seeds']} | {mean_pm_std(r['mae_mean'], r['mae_std'])}{unit} "
            f"| {mean_pm_std(r['baseline_mean'], r['baseline_std'])}{unit} "
            f"| {mean_pm_std(r['rmse_mean'], r['rmse_std'])}{unit} | {_train_time(r)} |"
        )
    forces = [r for r in summary if "force_mean" in r]
    if forces:
        lines += [
            "",
            "## Forces",
            "",
            "Force MAE per component (eV/Å) on each run's test structures, the model's forces being -dE/dx of its energy; "
            "zero-force baseline: predicting no force, on the same atoms. Energy MAE per atom beside it (eV).",
            "",
            "| configuration | orders | seeds | force MAE (eV/Å) | zero-force baseline (eV/Å) | energy MAE per atom (eV) |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(forces, key=lambda r: r["force_mean"]):
            lines.append(
                f"| {r['variant']} | [{r['orders'].replace(' ', ',')}] | {r['seeds']} | {mean_pm_std(r['force_mean'], r['force_std'])} "
                f"| {mean_pm_std(r['force_baseline_mean'], r['force_baseline_std'])} | {mean_pm_std(r['per_atom_mean'], r['per_atom_std'])} |"
            )
    return "\n".join(lines) + "\n"


def _train_time(row: dict[str, Any]) -> str:
    """Mean training time, per device when the seeds of a configuration ran on different ones (times do not mix)."""
    per = row.get("train_seconds_by_device") or {}
    if len(per) == 0 or list(per) == ["cpu"]:
        return f"{row['train_seconds_mean']:.0f}"
    return "; ".join(f"{d}: {mean:.0f} ({n} run{'s' if n > 1 else ''})" for d, (mean, n) in per.items())


def status_markdown(rows: list[dict[str, Any]]) -> str:
    """The runs that are not finished (failed, partial, not started), with a failure's error; "" if none."""
    pending = [r for r in rows if r.get("status", "finished") != "finished"]
    if not pending:
        return ""
    lines = [
        "",
        "## Runs not finished",
        "",
        f"{len(rows) - len(pending)} of {len(rows)} runs finished; the tables use the finished runs only.",
        "",
        "| run | status | error |",
        "|---|---|---|",
    ]
    for r in pending:
        lines.append(f"| {r['run']} | {r['status']} | {r['error'].replace('|', '/')} |")  # a "|" would split the cell
    return "\n".join(lines) + "\n"


def _relative_cell(row: dict[str, Any], name: str) -> str:
    return mean_pm_std(row[f"{name}_mean"], row[f"{name}_std"]) if f"{name}_mean" in row else ""


def mean_pm_std(mean: float, std: float) -> str:
    """``mean ± std`` with four decimals, or the mean alone for a single seed."""
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def collect_usage(sweep: Sweep, out_dir: str | Path) -> list[dict[str, Any]]:
    """Per analysed run and order: the all-blocks ablation ΔMAE, from the run's own analysis/usage.json."""
    rows = []
    for spec in sweep.runs:
        path = Path(out_dir) / spec.relpath / "analysis" / "usage.json"
        if not path.is_file():
            continue
        usage = read_usage(path.parents[1])
        if not usage_is_current(path.parents[1], usage):  # made from an earlier best.pt (the run was extended)
            print(f"note: {path} is of an earlier best.pt and is left out; `sweep --analyze` redoes it", file=sys.stderr)
            continue
        for r in usage["rows"]:
            if r["block"] == "all":
                rows.append(
                    {
                        "variant": spec.variant,
                        "seed": spec.seed,
                        "order": int(r["order"]),
                        "delta_mae_ev": r["ablation_delta_mae_ev"],
                        "model_mae_ev": usage.get("ablation_model_mae", usage["model_mae"]),
                        "verdict": r["verdict"],
                        "force_delta": r.get("force_delta_mae"),
                        "model_force_mae": usage.get("force_mae"),
                        "force_verdict": r.get("force_verdict") or "",
                    }
                )
    return rows


def usage_table(usage_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration variant and order: mean and sample standard deviation over seeds of the all-blocks ΔMAE."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in usage_rows:
        groups.setdefault((r["variant"], r["order"]), []).append(r)
    out = []
    for (variant, order), items in groups.items():
        out.append(
            {
                "variant": variant,
                "order": order,
                "seeds": len(items),
                **_mean_std([float(r["delta_mae_ev"]) for r in items], "delta"),
                **(_mean_std(relative, "relative") if (relative := _relative(items, "energy")) else {}),
                **_verdict_counts(items, "verdict", ""),
                **_force_usage(items),
            }
        )
    return out


def _relative(items: list[dict[str, Any]], what: str) -> list[float]:
    """Per run, the ΔMAE of an order divided by the model's own MAE (energies or forces); [] where a run lacks it.

    Models of different accuracy are compared by how much of their own error an order's
    removal adds: an energy-only and a force-trained model differ in energy MAE by 30 % or more.
    """
    delta, model = ("delta_mae_ev", "model_mae_ev") if what == "energy" else ("force_delta", "model_force_mae")
    if what == "forces" and not all(r.get("force_verdict") in VERDICTS for r in items):
        return []
    if not all(r.get(model) not in (None, "", 0) for r in items):
        return []
    return [float(r[delta]) / float(r[model]) for r in items]


def _force_usage(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds, the force ΔMAE of an order zeroed after every block, where every run analysed its forces."""
    if not items or not all(r.get("force_verdict") in VERDICTS for r in items):
        return {}
    relative = _relative(items, "forces")
    return {
        **_mean_std([float(r["force_delta"]) for r in items], "force_delta"),
        **(_mean_std(relative, "force_relative") if relative else {}),
        **_verdict_counts(items, "force_verdict", "force_"),
    }


VERDICTS = ("used", "uncertain", "unused")  # an analysis before the intervals has no "uncertain"


def _verdict_counts(items: list[dict[str, Any]], key: str, prefix: str) -> dict[str, int]:
    """How many seeds gave each verdict: ``{prefix}used_in``, ``{prefix}uncertain_in``, ``{prefix}unused_in``."""
    return {f"{prefix}{v}_in": sum(r[key] == v for r in items) for v in VERDICTS}


def _verdict_cell(u: dict[str, Any], prefix: str = "") -> str:
    return "/".join(str(u[f"{prefix}{v}_in"]) for v in VERDICTS)


def usage_comparisons(usage_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does the training change how much an order is used? Variants with the same orders, paired by seed, per order.

    For every pair of variants whose analyses cover the same orders (e.g. one trained on
    energies only, one on energies and forces) and every order, over the seeds both have:
    the difference of the relative ΔMAE (ΔMAE / the model's own MAE, :func:`_relative`) of
    the energy and, where both analysed forces, of the forces, with a paired t-test.
    """
    from scipy import stats

    by: dict[str, dict[int, dict[int, dict[str, Any]]]] = {}  # variant -> order -> seed -> row
    for r in usage_rows:
        by.setdefault(r["variant"], {}).setdefault(int(r["order"]), {})[int(r["seed"])] = r
    names = list(by)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if set(by[a]) != set(by[b]):
                continue
            for order in sorted(by[a]):
                seeds = sorted(set(by[a][order]) & set(by[b][order]))
                if len(seeds) < 2:
                    continue
                row: dict[str, Any] = {"a": a, "b": b, "order": order, "seeds": len(seeds)}
                for what, key in (("energy", "energy"), ("forces", "force")):
                    ra = _relative([by[a][order][s] for s in seeds], what)
                    rb = _relative([by[b][order][s] for s in seeds], what)
                    if not ra or not rb:
                        continue
                    diff = np.subtract(ra, rb)
                    t, p = stats.ttest_rel(ra, rb)
                    row.update({f"{key}_a": float(np.mean(ra)), f"{key}_b": float(np.mean(rb)), f"{key}_diff_mean": float(diff.mean()),
                                f"{key}_diff_std": float(diff.std(ddof=1)), f"{key}_t": float(t), f"{key}_p": float(p)})  # fmt: skip
                out.append(row)
    return out


def paired_comparisons(rows: list[dict[str, Any]], key: str = "test_mae_ev") -> list[dict[str, Any]]:
    """Every pair of configuration variants, paired by seed (same split): the difference of ``key`` and a paired t-test."""
    from scipy import stats

    by_variant: dict[str, dict[int, float]] = {}
    target: dict[str, str] = {}
    for r in _finished(rows):
        if r.get(key) in (None, ""):
            continue
        by_variant.setdefault(r["variant"], {})[r["seed"]] = float(r[key])
        target[r["variant"]] = r.get("target", "")
    names = list(by_variant)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if target[a] != target[b]:  # errors of different targets (units) are not compared
                continue
            seeds = sorted(set(by_variant[a]) & set(by_variant[b]))
            if len(seeds) < 2:
                continue
            diff = np.array([by_variant[a][s] - by_variant[b][s] for s in seeds])
            t, p = stats.ttest_rel([by_variant[a][s] for s in seeds], [by_variant[b][s] for s in seeds])
            out.append(
                {
                    "a": a,
                    "b": b,
                    "seeds": len(seeds),
                    "diff_mean": float(diff.mean()),
                    "diff_std": float(diff.std(ddof=1)),
                    "a_better": int(np.sum(diff < 0)),
                    "t": float(t),
                    "p": float(p),
                }
            )
    return out


def comparison_markdown(rows: list[dict[str, Any]], usage_rows: list[dict[str, Any]]) -> str:
    """Paired comparisons and, when runs were analysed, the all-blocks ablation per order."""
    lines = []
    pairs = paired_comparisons(rows)
    if pairs:
        lines += [
            "",
            "## Paired comparisons (same seed = same subset and split)",
            "",
            "| a | b | seeds | MAE(a) - MAE(b) (target unit) | a better in | paired t | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in pairs:
            lines.append(
                f"| {c['a']} | {c['b']} | {c['seeds']} | {mean_pm_std(c['diff_mean'], c['diff_std'])} "
                f"| {c['a_better']}/{c['seeds']} | {c['t']:.2f} | {c['p']:.3f} |"
            )
    force_pairs = paired_comparisons(rows, "test_force_mae")
    if force_pairs:
        lines += [
            "",
            "## Paired comparisons of the force MAE (eV/Å)",
            "",
            "| a | b | seeds | force MAE(a) - force MAE(b) | a better in | paired t | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in force_pairs:
            lines.append(
                f"| {c['a']} | {c['b']} | {c['seeds']} | {mean_pm_std(c['diff_mean'], c['diff_std'])} "
                f"| {c['a_better']}/{c['seeds']} | {c['t']:.2f} | {c['p']:.3f} |"
            )
    table = usage_table(usage_rows)
    if table:
        lines += [
            "",
            "## Order usage: MAE increase when the order is zeroed after every block",
            "",
            "From each run's `analysis/usage.json` (its own test split); mean ± sample standard deviation over seeds. "
            "Relative: the ΔMAE divided by the model's own MAE on the same structures (1.0: zeroing the order doubles the error). "
            "Verdicts per seed: from the 95 % interval of each run's relative ΔMAE against its threshold (uncertain: it straddles it; "
            "analyses made before the intervals have point verdicts only).",
            "",
            "| configuration | order | seeds | ΔMAE (target unit) | relative | seeds used / uncertain / unused "
            "| force ΔMAE (eV/Å) | relative | forces: used / uncertain / unused |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for u in table:
            force = (
                f"{mean_pm_std(u['force_delta_mean'], u['force_delta_std'])} | {_relative_cell(u, 'force_relative')} "
                f"| {_verdict_cell(u, 'force_')}"
                if "force_delta_mean" in u
                else " | | "
            )
            lines.append(
                f"| {u['variant']} | {u['order']} | {u['seeds']} | {mean_pm_std(u['delta_mean'], u['delta_std'])} "
                f"| {_relative_cell(u, 'relative')} | {_verdict_cell(u)} | {force} |"
            )
    changes = usage_comparisons(usage_rows)
    if changes:
        lines += [
            "",
            "## Does the training change how much an order is used? (paired by seed)",
            "",
            "Variants with the same orders, per order: the relative ΔMAE of a (ΔMAE / its own MAE) minus b's, "
            "mean ± sd over the seeds both have, and a paired t-test (with 3 seeds only a large, consistent change reaches p < 0.05).",
            "",
            "| a | b | order | seeds | energy: rel. ΔMAE a − b | t | p | forces: rel. ΔMAE a − b | t | p |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in changes:
            cells = []
            for key in ("energy", "force"):
                if f"{key}_diff_mean" in c:
                    cells.append(f"{mean_pm_std(c[f'{key}_diff_mean'], c[f'{key}_diff_std'])} | {c[f'{key}_t']:.2f} | {c[f'{key}_p']:.3f}")
                else:
                    cells.append(" | | ")
            lines.append(f"| {c['a']} | {c['b']} | {c['order']} | {c['seeds']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + ("\n" if lines else "")
