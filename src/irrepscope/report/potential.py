"""The report of a potential analysis (a model against itself): usage.csv, usage.json, usage.png, report.html."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from irrepscope.analysis.potential import ROW_FIELDS  # noqa: E402
from irrepscope.atomic import atomic_write, atomic_write_text  # noqa: E402
from irrepscope.report.analysis import _fmt, _grid, _heat, _table, usage_csv, write_staged  # noqa: E402
from irrepscope.report.images import figure_png, png_img_tag  # noqa: E402


def potential_figure(result: dict[str, Any]) -> plt.Figure:
    """Left: block x order heat maps of the relative force change and the energy change; right: all blocks, per class."""
    orders, nb = result["analysed_orders"], result["num_blocks"]
    classes = result["classes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * nb + 3.0), constrained_layout=True)
    _heat(axes[0], _grid(result["rows"], "force_change_rel", nb, orders), orders, range(1, nb + 1), "mean |ΔF| / mean |F|")
    _heat(axes[1], _grid(result["rows"], "energy_change_per_atom", nb, orders), orders, range(1, nb + 1), "mean |ΔE| per atom (eV)")
    for ax in axes[:2]:
        ax.set_xlabel("order l zeroed after this block")
        ax.set_ylabel("block")
    ax = axes[2]
    width = 0.8 / max(len(classes), 1)
    for k, c in enumerate(classes):
        by_order = {r["order"]: r for r in c["rows"]}
        get = lambda l, key: by_order[l].get(key) if l in by_order and by_order[l].get(key) is not None else np.nan  # noqa: E731
        values = np.array([get(l, "force_change_rel") for l in orders], dtype=float)
        err = None
        if "interval_level" in result:  # error bars: the bootstrap interval within the class
            lo = np.array([get(l, "force_change_rel_lo") for l in orders], dtype=float)
            hi = np.array([get(l, "force_change_rel_hi") for l in orders], dtype=float)
            err = [values - lo, hi - values]
        ax.bar(np.arange(len(orders)) + (k - (len(classes) - 1) / 2) * width, values, width, yerr=err, capsize=2,
               label=f"{c['class']} ({c['structures']})")  # fmt: skip
    ax.axhline(result["force_threshold"], color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(orders)), [str(l) for l in orders])
    ax.set_yscale("log")
    ax.set_xlabel("order l zeroed after every block")
    ax.set_title("mean |ΔF| / mean |F| per class (dashed: threshold; bars: intervals)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def potential_summary(result: dict[str, Any]) -> str:
    """A few plain sentences: what was analysed, what each order does to energies and forces, by class."""
    alls = [r for r in result["rows"] if r["block"] == "all"]
    effects = "; ".join(
        f"l={r['order']}: forces {_pct(r['force_change_rel'])}{_pct_interval(r, 'force_change_rel')} of their size, "
        f"energy {_fmt(1000 * r['energy_change_per_atom'])} meV/atom"
        for r in alls
    )
    parts = [
        f"{result['model']} on {result['n_structures']} structures ({result['n_atoms']} atoms) of {result['structures']}; "
        f"the model's mean |F| is {result['mean_force']:.3g} eV/Å.",
        f"Zeroing one order after every block changes: {effects}.",
    ]
    for c in result["classes"]:
        used = [str(r["order"]) for r in c["rows"] if r["verdict"] == "used" and r["order"] != 0]
        unsure = [str(r["order"]) for r in c["rows"] if r["verdict"] == "uncertain" and r["order"] != 0]
        rel = ", ".join(f"l={r['order']} {_pct(r['force_change_rel'])}{_pct_interval(r, 'force_change_rel')}"
                        for r in c["rows"] if r["order"] != 0)  # fmt: skip
        parts.append(
            f"{c['class']} ({c['structures']} structures): orders > 0 used: {', '.join(used) if used else 'none'}"
            + (f", uncertain: {', '.join(unsure)}" if unsure else "")
            + (f" (force change {rel})" if rel else "")
            + "."
        )
    if result.get("force_mae") is not None:
        parts.append(
            f"Against the structures' own forces (another level of theory): MAE {result['force_mae']:.3g} eV/Å, "
            f"zero-force baseline {result['force_baseline_mae']:.3g}."
        )
    parts.append(
        f"An order counts as used when zeroing it changes the energy by at least {1000 * result['energy_threshold']:.3g} meV/atom "
        f"or the forces by at least {result['force_threshold']:.0%} of their mean size"
        + (f", for the whole {result['interval_level']:.0%} interval (a bootstrap over the structures; "
           "uncertain where the interval straddles the threshold)." if "interval_level" in result else ".")
    )  # fmt: skip
    return " ".join(parts)


def _pct_interval(r: dict[str, Any], key: str) -> str:
    lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" [{100 * lo:.3g}, {100 * hi:.3g}] %"


def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.3g} %"


def write_potential_analysis(out: Path, result: dict[str, Any], started: float | None = None) -> dict[str, Any]:
    """usage.csv, usage.png, report.html and usage.json of a potential analysis, as one set onto ``out``."""

    def write(staged: Path) -> None:
        atomic_write_text(staged / "usage.csv", usage_csv(result["rows"], ROW_FIELDS))
        png = figure_png(potential_figure(result), dpi=100)
        atomic_write(staged / "usage.png", lambda f: f.write(png))
        class_rows = [{"class": c["class"], "structures": c["structures"], "atoms": c["atoms"], "mean |F|": c["mean_force"],
                       **{f"l={r['order']} {k}{end}": r.get(f"{v}{end}") for r in c["rows"] for k, v in
                          (("|ΔF|/|F|", "force_change_rel"), ("|ΔE|/atom", "energy_change_per_atom"), ("verdict", "verdict"))
                          for end in (("",) if v == "verdict" else ("", "_lo", "_hi"))}}
                      for c in result["classes"]]  # fmt: skip
        fields = ROW_FIELDS if result.get("force_mae") is not None else [f for f in ROW_FIELDS if not f.startswith("force_delta")]
        doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>irrepscope potential analysis: {html.escape(result['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}}img{{max-width:100%}}
.summary{{font-size:16px;background:#eef5ff;padding:1em}}</style></head>
<body><h1>Which orders carry the energies and forces: {html.escape(result['model'])}</h1>
<p>Model {html.escape(result['model'])} ({html.escape(result['family'])}, {result['num_blocks']} blocks:
{html.escape(', '.join(result['block_irreps']))}) on {result['n_structures']} structures of
<code>{html.escape(str(result['structures']))}</code>. Every measure compares the model with itself: an order is zeroed
after one block (or after every block), energies and forces are recomputed through the model's own forward pass, and
the change is measured on the same structures. No labels are needed.</p>
<h2>Summary</h2><p class="summary">{html.escape(potential_summary(result))}</p>
<h2>By class of structure (order zeroed after every block)</h2>{_table(class_rows, list(class_rows[0]) if class_rows else [])}
<figure>{png_img_tag(png, "usage")}<figcaption>Per block and order, and per class after every block.</figcaption></figure>
<h2>Every block</h2>
<p><b>energy_change_per_atom</b>: mean over structures of |&Delta;E| / atoms (eV). <b>force_change</b>: mean |&Delta;F| per
component (eV/&Aring;); <b>force_change_rel</b>: that over the model's mean |F|. <b>verdict</b>: {html.escape(result['verdict_rule'])}
(energy_threshold {result['energy_threshold']:.3g} eV/atom, force_threshold {result['force_threshold']:.3g}).
{'<b>force_delta_mae</b>: force MAE against the structures&#39; own forces with the order zeroed, minus without.' if 'force_delta_mae' in fields else ''}</p>
{_table(result['rows'], fields)}
<h2>Stage timings (s)</h2>{_table([result['timings_s']], list(result['timings_s']))}
</body></html>
"""
        atomic_write_text(staged / "report.html", doc)

    return write_staged(out, result, write, started)
