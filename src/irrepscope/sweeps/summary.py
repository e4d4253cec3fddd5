"""Gather a sweep's runs into results.csv and summarise them per configuration with error bars."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from irrepscope.atomic import atomic_write_text
from irrepscope.sweeps.spec import Sweep
from irrepscope.training.runs import RunDir

RESULT_FIELDS = [
    "config", "variant", "orders", "hidden_mul", "params", "seed", "epochs", "train_seconds",
    "test_mae_ev", "test_rmse_ev", "n_test", "best_epoch", "run",
]  # fmt: skip


def collect_results(sweep: Sweep, out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished run, read from the run's own test.json and metrics.csv."""
    rows = []
    for spec in sweep.runs:
        run = RunDir.at(Path(out_dir) / spec.relpath)
        if not run.test.is_file():
            continue
        test = json.loads(run.test.read_text())
        metrics = run.read_metrics()
        rows.append(
            {
                "config": spec.config_name,
                "variant": spec.variant,
                "orders": " ".join(map(str, spec.config.model.orders)),
                "hidden_mul": spec.config.model.hidden_mul,
                "params": test["params"],
                "seed": spec.seed,
                "epochs": len(metrics),
                "train_seconds": round(sum(float(r["epoch_seconds"]) for r in metrics), 1),
                "test_mae_ev": test["mae_ev"],
                "test_rmse_ev": test["rmse_ev"],
                "n_test": test["n"],
                "best_epoch": test["epoch"],
                "run": spec.relpath,
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration variant: mean and sample standard deviation over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for variant, items in groups.items():
        mae = np.array([r["test_mae_ev"] for r in items])
        rmse = np.array([r["test_rmse_ev"] for r in items])
        secs = np.array([r["train_seconds"] for r in items])
        out.append(
            {
                "variant": variant,
                "orders": items[0]["orders"],
                "hidden_mul": items[0]["hidden_mul"],
                "params": items[0]["params"],
                "seeds": len(items),
                "mae_mean": float(mae.mean()),
                "mae_std": float(mae.std(ddof=1)) if len(mae) > 1 else math.nan,
                "rmse_mean": float(rmse.mean()),
                "rmse_std": float(rmse.std(ddof=1)) if len(rmse) > 1 else math.nan,
                "train_seconds_mean": float(secs.mean()),
            }
        )
    return sorted(out, key=lambda r: r["mae_mean"])


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
        "Test error on each run's own held-out split; mean ± sample standard deviation over seeds.",
        "",
        "| configuration | orders | H | params | seeds | test MAE (eV) | test RMSE (eV) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | [{r['orders'].replace(' ', ',')}] | {r['hidden_mul']} | {r['params']:,} | {r['seeds']} "
            f"| {mean_pm_std(r['mae_mean'], r['mae_std'])} | {mean_pm_std(r['rmse_mean'], r['rmse_std'])} | {r['train_seconds_mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def mean_pm_std(mean: float, std: float) -> str:
    """``mean ± std`` with four decimals, or the mean alone for a single seed."""
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"
