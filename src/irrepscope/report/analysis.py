"""The analysis report: usage heat maps, path-weight heat maps, latent maps (PNG) and report.html."""

from __future__ import annotations

import csv
import html
import io
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from irrepscope.analysis.usage import FIELDS, FORCE_FIELDS  # noqa: E402
from irrepscope.atomic import atomic_write, atomic_write_json, atomic_write_text, replace_directory, staging_directory  # noqa: E402
from irrepscope.data.multipoles import target_order  # noqa: E402
from irrepscope.errors import IrrepscopeError  # noqa: E402
from irrepscope.report.images import figure_png, png_img_tag  # noqa: E402

MEASURES = [
    ("ablation_delta_mae_ev", "ablation: delta MAE"),
    ("grad_x_input", "|<grad, x>| per atom"),
    ("norm_share_node", "norm share (atoms)"),
    ("probe_r2", "probe R^2"),
]


def _grid(rows: list[dict[str, Any]], key: str, blocks: int, orders: list[int]) -> np.ndarray:
    grid = np.full((blocks, len(orders)), np.nan)
    for r in rows:
        if r["block"] != "all" and r["order"] in orders and r[key] is not None:
            grid[int(r["block"]) - 1, orders.index(r["order"])] = r[key]
    return grid


def _heat(ax, grid: np.ndarray, xlabels, ylabels, title: str, fmt: str = "{:.3g}") -> None:
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(xlabels)), [str(x) for x in xlabels])
    ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels])
    ax.set_title(title, fontsize=9)
    for (i, j), v in np.ndenumerate(grid):
        if math.isfinite(v) and grid.size <= 80:
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="w")
    plt.colorbar(im, ax=ax, shrink=0.8)


def _has_forces(result: dict[str, Any]) -> bool:
    return result.get("force_mae") is not None


def usage_figure(result: dict[str, Any]) -> plt.Figure:
    """Heat maps block x order of each usage measure (and of the force ablation, where forces were analysed)."""
    orders, nb = result["analysed_orders"], result["num_blocks"]
    measures = MEASURES + ([("force_delta_mae", "forces: delta MAE (eV/Å)")] if _has_forces(result) else [])
    fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 0.5 * nb + 2.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, measures):
        _heat(ax, _grid(result["rows"], key, nb, orders), orders, range(1, nb + 1), title)
        ax.set_xlabel("order l")
        ax.set_ylabel("block")
    return fig


def verdict_figure(result: dict[str, Any]) -> plt.Figure | None:
    """What the verdicts read: ΔMAE / MAE per order with its interval (error bars), per block and after every block,
    for the energies and (where analysed) the forces, beside the threshold. None for an analysis without intervals."""
    panels = [("ablation_delta_rel", "energy: ΔMAE / MAE")]
    if _has_forces(result):
        panels.append(("force_delta_rel", "forces: ΔMAE / MAE"))
    rows = [r for r in result["rows"] if r.get(f"{panels[0][0]}_lo") is not None]
    if not rows:
        return None
    orders, nb = result["analysed_orders"], result["num_blocks"]
    groups = [*range(1, nb + 1), "all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), constrained_layout=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        width = 0.8 / len(groups)
        for k, g in enumerate(groups):
            pts = [(orders.index(r["order"]), r[key], r[f"{key}_lo"], r[f"{key}_hi"]) for r in rows
                   if r["block"] == g and r["order"] in orders and r.get(key) is not None and math.isfinite(r[key])]  # fmt: skip
            if not pts:
                continue
            x, v, lo, hi = (np.asarray(c, dtype=float) for c in zip(*pts))
            style = dict(color="k", marker="s", ms=5) if g == "all" else dict(marker="o", ms=3)
            ax.errorbar(x + (k - (len(groups) - 1) / 2) * width, v, yerr=[v - lo, hi - v], ls="none", capsize=2,
                        label="every block" if g == "all" else f"block {g}", **style)  # fmt: skip
        ax.axhline(result["threshold"], color="r", lw=0.8, ls="--", label="threshold")
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_yscale("symlog", linthresh=result["threshold"] / 10 if result["threshold"] > 0 else 1e-3)
        ax.set_xticks(range(len(orders)), [str(l) for l in orders])
        ax.set_xlabel("order l zeroed")
        ax.set_title(f"{title}, {result.get('interval_level', 0.95):.0%} intervals", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best")
    return fig


def paths_figure(result: dict[str, Any]) -> plt.Figure | None:
    """Per block, RMS of the per-edge path weights by (l_in, l_out), combined over l_edge (root mean square)."""
    paths = result["paths"]
    if not paths:
        return None
    nb = result["num_blocks"]
    fig, axes = plt.subplots(1, nb, figsize=(3.2 * nb, 3.2), constrained_layout=True, squeeze=False)
    for b in range(1, nb + 1):
        sel = [p for p in paths if p["block"] == b]
        lin = sorted({p["l_in"] for p in sel})
        lout = sorted({p["l_out"] for p in sel})
        acc = np.zeros((len(lin), len(lout)))
        cnt = np.zeros_like(acc)
        for p in sel:
            i, j = lin.index(p["l_in"]), lout.index(p["l_out"])
            acc[i, j] += p["rms"] ** 2
            cnt[i, j] += 1
        grid = np.where(cnt > 0, np.sqrt(acc / np.maximum(cnt, 1)), np.nan)
        ax = axes[0, b - 1]
        _heat(ax, grid, lout, lin, f"block {b}", "{:.2f}")
        ax.set_xlabel("l_out")
        ax.set_ylabel("l_in")
    fig.suptitle("RMS of per-edge tensor-product weights (over l_edge)", fontsize=10)
    return fig


def map_figure(name: str, coords: np.ndarray, colours: dict[str, np.ndarray], scores: dict[str, Any], method: str) -> plt.Figure:
    """One latent map coloured by each colouring."""
    n = len(colours)
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), constrained_layout=True, squeeze=False)
    for ax, (label, values) in zip(axes.flat, colours.items()):
        sc = ax.scatter(coords[:, 0], coords[:, 1], c=values, s=3, cmap="viridis", rasterized=True)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        plt.colorbar(sc, ax=ax, shrink=0.8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    knn, trust = scores.get("knn_r2"), scores.get("trustworthiness")
    fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
    fig.suptitle(f"{method.upper()} map of {name} (kNN R^2 {fmt(knn)}, trustworthiness {fmt(trust)})", fontsize=10)
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return "n/a" if v is None else str(v)


def summary_text(result: dict[str, Any]) -> str:
    """A few plain sentences: MAE, the all-blocks ablation per order, unused orders, suggested list."""
    unit = result.get("unit") or ""
    alls = [r for r in result["rows"] if r["block"] == "all"]
    effects = ", ".join(f"l={r['order']}: {_cell(r, 'ablation_delta_mae_ev')} {unit}" for r in alls)
    unused = result["unused_orders"]
    base, ratio = result.get("baseline_mae"), result.get("mae_ratio_to_baseline")
    name = result.get("baseline_name", "composition baseline")
    if base is None:  # usage.json of an analysis that predates the baseline
        first = []
    elif result.get("beats_baseline"):
        first = [
            f"The model's MAE is {1 / ratio:.1f}x lower than the {name}'s "
            f"({result['model_mae']:.4g} vs {base:.4g} {unit} on the same molecules)."
        ]
    else:
        what = "the zero vector" if name == "zero baseline" else "a least-squares fit on element counts"
        first = [
            f"This model is not clearly better than the {name} (MAE {result['model_mae']:.4g} vs "
            f"{base:.4g} {unit} on the same molecules, {what}): its usage verdicts "
            "describe a model that has not learned beyond composition."
        ]
    parts = first + [
        f"On {result['n_molecules']} molecules of the {result.get('split', 'evaluated')} split the model's MAE is "
        f"{result['model_mae']:.4g} {unit}.",
        f"Zeroing one order after every block changes the MAE by: {effects}.",
        f"An order counts as unused when that change is below {result['threshold']:.0%} of the model's MAE "
        f"on the same {result['ablation_molecules']} molecules ({result['threshold_ev']:.3g} {unit}).",
    ]
    if _has_forces(result):
        force_effects = ", ".join(f"l={r['order']}: {_cell(r, 'force_delta_mae')}" for r in alls)
        parts.append(
            f"Forces (on {result['force_structures']} structures, {result['force_atoms']} atoms): MAE "
            f"{result['force_mae']:.4g} eV/Å per component vs the zero-force baseline's {result['force_baseline_mae']:.4g}; "
            f"zeroing one order after every block changes it by: {force_effects} eV/Å (unused below "
            f"{result['threshold']:.0%} of the model's force MAE). An order is unused only if unused for both."
        )
    uncertain = result.get("uncertain_orders") or []
    if "interval_level" in result:
        parts.append(
            f"Each verdict reads the {result['interval_level']:.0%} interval of that change (a paired bootstrap over the molecules); "
            + (f"for orders {uncertain} it straddles the threshold: these molecules cannot tell, so they are kept." if uncertain
               else "none straddles the threshold.")
        )  # fmt: skip
    if unused:
        parts.append(f"Unused orders: {unused}. Suggested pruned order list: {result['suggested_orders']} (order 0 is always kept).")
    elif uncertain:
        parts.append(f"No order is unused for sure; nothing to prune (orders {result['orders']}).")
    else:
        parts.append(f"Every analysed order is used; nothing to prune (orders {result['orders']}).")
    return " ".join(parts)


def _interval_note(result: dict[str, Any]) -> str:
    """How the intervals were made (empty for an analysis that predates them)."""
    if "interval_level" not in result:
        return "This analysis predates the intervals: its verdicts compare point estimates with the threshold."
    return (
        f"Intervals [lo, hi]: {result['interval_level']:.0%} percentile intervals of a paired bootstrap over the analysed "
        f"structures ({result['interval_resamples']} resamples, seed {result['interval_seed']}): a model and its ablation "
        "are compared on the same resampled structures."
    )


def _readout_note(result: dict[str, Any]) -> str:
    """What the last block can feed, stated for our model (whose readout is linear in one order)."""
    if result.get("family", "irrepscope") != "irrepscope":
        return ""
    l = target_order(result["target"])
    return f"The readout reads only l = {l}, so zeroing any other order at the last block has no effect by construction."


def _cell(r: dict[str, Any], f: str) -> str:
    """A value, followed by its interval ``[lo, hi]`` where the row has one."""
    text = _fmt(r.get(f))
    lo, hi = r.get(f"{f}_lo"), r.get(f"{f}_hi")
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:.3g}, {hi:.3g}]"
    return text


def _table(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """An HTML table; a field's ``_lo`` / ``_hi`` bounds are shown in its cell, not as columns of their own."""
    shown = [f for f in fields if not (f.endswith(("_lo", "_hi")) and f[:-3] in fields)]
    head = "".join(f"<th>{html.escape(f)}</th>" for f in shown)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, f))}</td>" for f in shown) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_analysis_report(
    out: Path, result: dict[str, Any], config_yaml: str, test_metrics: dict[str, Any] | None, progress: bool = False
) -> list[Path]:
    """Write the PNGs and report.html into ``out``; returns the paths written."""
    images: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    images.append(("usage.png", "Usage measures per block and order", figure_png(usage_figure(result), dpi=100)))
    vfig = verdict_figure(result)
    if vfig is not None:
        images.append(("verdicts.png", "ΔMAE / MAE per order with its interval: what the verdicts read", figure_png(vfig, dpi=100)))
    pfig = paths_figure(result)
    if pfig is not None:
        images.append(("paths.png", "Tensor-product path weights", figure_png(pfig, dpi=100)))
    maps = result.get("_maps", {})
    for name, coords in maps.get("coords", {}).items():
        fig = map_figure(name, coords, maps["colours"], result["maps"][name], result["embedding"])
        fname = "map_" + name.replace("=", "").replace(" ", "_") + ".png"
        images.append((fname, f"Latent map: {name}", figure_png(fig, dpi=80)))
    written = []
    for fname, _, png in images:
        written.append(atomic_write(out / fname, lambda f, png=png: f.write(png)))
    metrics = {
        "split": result.get("split"),
        "molecules": result["n_molecules"],
        "MAE": result["model_mae"],
        "RMSE": result["model_rmse"],
        "baseline MAE": result.get("baseline_mae"),
        "baseline RMSE": result.get("baseline_rmse"),
        "MAE / baseline MAE": result.get("mae_ratio_to_baseline"),
    }
    named = {"MAE": "model_mae", "baseline MAE": "baseline_mae", "MAE / baseline MAE": "mae_ratio_to_baseline"}
    if _has_forces(result):
        metrics.update({"force MAE (eV/Å)": result["force_mae"], "zero-force baseline MAE": result["force_baseline_mae"]})
        named.update({"force MAE (eV/Å)": "force_mae", "zero-force baseline MAE": "force_baseline_mae"})
    for label, key in named.items():  # the intervals, shown in the cells
        bounds = result.get("intervals", {}).get(key)
        if bounds is not None:
            metrics[f"{label}_lo"], metrics[f"{label}_hi"] = bounds
    fields = FIELDS if _has_forces(result) else [f for f in FIELDS if f not in FORCE_FIELDS]
    test_metrics = {k: v for k, v in (test_metrics or {}).items() if k != "pins"}  # sha256s: for checks, not reading
    test_html = _table([test_metrics], list(test_metrics)) if test_metrics else "<p>No test.json in the run.</p>"
    map_rows = [{"map": k, **v} for k, v in result["maps"].items()]
    paths_rows = result["paths"]
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>irrepscope analysis: {html.escape(str(result.get('run', '')))}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}}img{{max-width:100%}}
pre{{background:#f6f6f6;padding:1em}}.summary{{font-size:16px;background:#eef5ff;padding:1em}}</style></head>
<body><h1>Order usage analysis</h1>
<p>Run: <code>{html.escape(str(result.get('run', '')))}</code>, checkpoint {html.escape(str(result.get('checkpoint', '')))},
target {html.escape(result['target'])} ({html.escape(result.get('unit') or '')}).
Made from: the {html.escape(str(result.get('split', '')))} split ({result['n_molecules']} structures), orders analysed
{html.escape(str(result.get('analysed_orders', result.get('orders'))))} of {html.escape(str(result.get('orders')))},
threshold {result['threshold']:.3g} (fraction of the model's MAE).</p>
<h2>Summary</h2><p class="summary">{html.escape(summary_text(result))}</p>
<h2>Metrics</h2><p>On the analysed molecules of the run's own saved split, beside the
{html.escape(result.get('baseline_rule', 'composition baseline'))}, on the same molecules:</p>{_table([metrics], list(metrics))}
<p>The run's test.json:</p>{test_html}
<h2>Usage</h2>
<p><b>ablation_delta_mae_ev</b>: MAE with the order zeroed after that block minus the model's MAE (block "all": after every block;
the primary measure), on a seeded subset of {result['ablation_molecules']} of the analysed molecules, like <b>grad_x_input</b>: per atom,
sum over copies of |&lt;dpred/dx, x&gt;| (rotation invariant). <b>norm_share</b>: share of the squared feature norm (atoms / pooled molecules). <b>probe_r2</b>: ridge probe
of the target from the order's invariant graph features at that block, fit on {result['probe_molecules']} training molecules.
<b>ablation_delta_rel</b>: that over the model's MAE on the same molecules.
<b>verdict</b>: unused when the whole interval of ablation_delta_rel lies below {result['threshold']:.0%} (the model's MAE on the
molecules the effect was measured on: the {result['ablation_molecules']} ablation molecules), used when it lies
at or above it, <b>uncertain</b> when it straddles it: these molecules cannot tell, and such an order is not pruned.
{html.escape(_interval_note(result))}
{'<b>force_delta_mae</b>: force MAE per component (eV/&Aring;) with the order zeroed, forces recomputed through the model, minus the model&#39;s, on the ablation structures; <b>force_verdict</b> likewise against the force MAE. Against the model itself (no labels needed): <b>energy_change_per_atom</b>, mean |&Delta;E| per atom (eV), <b>force_change</b>, mean |&Delta;F| per component (eV/&Aring;), and <b>force_change_rel</b>, that over the model&#39;s mean |F|.' if _has_forces(result) else ''}
{_readout_note(result)}</p>
{_table(result['rows'], fields)}
{''.join(f'<figure>{png_img_tag(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>' for f, cap, png in images if f in ('verdicts.png', 'usage.png', 'paths.png'))}
<h2>Latent space</h2>
<p>{html.escape(result['embedding'].upper())} maps (knn 10) of the sum-pooled last-block graph embedding on {result['map_molecules']} molecules,
from rotation-invariant inputs only: l = 0 as it is, l &gt; 0 the norm of each copy; columns standardised. kNN R^2: 10-nearest-neighbour
regression of the target inside the 2-D map (5-fold CV); trustworthiness: sklearn, 10 neighbours.</p>
{_table(map_rows, ['map', 'knn_r2', 'trustworthiness', 'n'])}
{''.join(f'<figure>{png_img_tag(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>' for f, cap, png in images if f.startswith('map_'))}
<h2>Tensor-product path weights</h2>
<details><summary>RMS of the per-edge weights of every path ({len(paths_rows)} paths)</summary>{_table(paths_rows, ['block', 'l_in', 'l_edge', 'l_out', 'rms'])}</details>
<h2>Configuration</h2><pre>{html.escape(config_yaml)}</pre>
<h2>Stage timings (s)</h2>{_table([result['timings_s']], list(result['timings_s']))}
</body></html>
"""
    written.append(atomic_write_text(out / "report.html", doc))
    return written


def usage_csv(rows: list[dict[str, Any]], fields: list[str] = FIELDS) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
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


def is_analysis_file(name: str) -> bool:
    """Whether an analysis writes a file of this name (what replacing an analysis folder may remove)."""
    return name in ("usage.csv", "usage.json", "report.html") or (name.endswith(".png") and "/" not in name)


def refuse_foreign_files(out: Path) -> None:
    """Refuse to replace a folder that holds anything an analysis does not write (it would be deleted with the old set)."""
    if not out.is_dir():
        if out.exists():
            raise IrrepscopeError(f"{out} is a file, not an analysis folder")
        return
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and is_analysis_file(p.name)))
    if foreign:
        raise IrrepscopeError(
            f"{out} holds files an analysis does not write ({', '.join(foreign[:3])}), which replacing it would delete; "
            "move them, or choose another --out"
        )


def write_analysis(
    out: Path,
    result: dict[str, Any],
    config_yaml: str,
    test_metrics: dict[str, Any] | None,
    progress: bool = False,
    started: float | None = None,
) -> dict[str, Any]:
    """Write usage.csv, the PNGs, report.html and usage.json as one set onto ``out``; returns usage.json's content.

    The set is written into a staging sibling and swapped onto ``out`` in one step
    (:func:`irrepscope.atomic.replace_directory`): a kill leaves the previous analysis
    whole, never new verdicts beside old ones. The caller holds the lock of ``out``'s run
    (or of ``out``). ``started``: ``time.perf_counter()`` when the analysis began.
    """

    def write(staged: Path) -> None:
        atomic_write_text(staged / "usage.csv", usage_csv(result["rows"]))
        write_analysis_report(staged, result, config_yaml, test_metrics, progress=progress)

    return write_staged(out, result, write, started)


def write_staged(out: Path, result: dict[str, Any], write: Callable[[Path], None], started: float | None = None) -> dict[str, Any]:
    """``write(staged)`` the files of an analysis, then usage.json, into a staging sibling swapped onto ``out`` in one step.

    Shared by every kind of analysis: a kill leaves the previous one whole; a folder holding
    files an analysis does not write is refused. Returns usage.json's content.
    """
    import time

    refuse_foreign_files(out)
    staged = staging_directory(out)
    try:
        t = time.perf_counter()
        write(staged)
        result["timings_s"]["report"] = time.perf_counter() - t
        if started is not None:
            result["timings_s"]["total"] = time.perf_counter() - started
        public = _json_safe({k: v for k, v in result.items() if not k.startswith("_")})
        atomic_write_json(staged / "usage.json", public)
        replace_directory(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return public
