"""A sweep's outputs: results.csv, summary.md, summary.html with error-bar plots."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from irrepscope.atomic import atomic_write, atomic_write_text  # noqa: E402
from irrepscope.data.composition import baseline_name, unit_of  # noqa: E402
from irrepscope.report.images import figure_png, png_img_tag  # noqa: E402
from irrepscope.sweeps.spec import Sweep  # noqa: E402
from irrepscope.sweeps.summary import (  # noqa: E402
    collect_results,
    collect_usage,
    comparison_markdown,
    status_markdown,
    summarize,
    summary_markdown,
    write_results_csv,
)


def error_bar_figure(summary: list[dict[str, Any]]) -> plt.Figure:
    """Test MAE (mean ± std over seeds) against parameters and against training time."""
    # One target per figure (errors of different targets have different units): the first configuration's.
    target = summary[0]["target"]
    summary = [r for r in summary if r["target"] == target]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for x_key, ax, label in (("params", axes[0], "parameters"), ("train_seconds_mean", axes[1], "training time per run (s)")):
        for r in summary:
            std = 0.0 if math.isnan(r["mae_std"]) else r["mae_std"]
            ax.errorbar(r[x_key], r["mae_mean"], yerr=std, fmt="o", capsize=4, label=r["variant"])
            ax.annotate(f"[{r['orders'].replace(' ', ',')}]", (r[x_key], r["mae_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        base = np.mean([r["baseline_mean"] for r in summary])
        ax.axhline(base, color="grey", ls="--", lw=1, label=f"{baseline_name(target)} ({base:.3g} {unit_of(target)})")
        ax.set_xlabel(label)
        ax.set_ylabel(f"test MAE of {target} ({unit_of(target)})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    return fig


def write_sweep_report(sweep: Sweep, out_dir: str | Path) -> list[Path]:
    """Write results.csv (every run, with its status), summary.md, summary.png and summary.html (finished runs; the others listed)."""
    out = Path(out_dir)
    rows = collect_results(sweep, out)
    write_results_csv(rows, out / "results.csv")
    summary = summarize(rows)
    extra = status_markdown(rows) + comparison_markdown(rows, collect_usage(sweep, out))
    markdown = summary_markdown(sweep.name, summary) + extra
    atomic_write_text(out / "summary.md", markdown)
    png = b""
    if summary:
        png = figure_png(error_bar_figure(summary), dpi=120)
        atomic_write(out / "summary.png", lambda f: f.write(png))
    atomic_write_text(out / "summary.html", _html(sweep.name, markdown, png))
    return [out / "results.csv", out / "summary.md", out / "summary.html"]


def _html(name: str, markdown: str, png: bytes) -> str:
    """summary.md as a self-contained page, the error-bar plot after its first table."""
    summary, _, rest = markdown.partition("\n\n## ")
    rest = f"## {rest}" if rest else ""
    image = png_img_tag(png, "test MAE against parameters and time") if png else "<p>No finished runs yet.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sweep {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body>
{_markdown_tables_html(summary)}
{image}
{_markdown_tables_html(rest)}
</body></html>
"""


def _markdown_tables_html(markdown: str) -> str:
    """The few markdown constructs summary.md uses (# and ## headings, paragraphs, pipe tables) as HTML."""
    out, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = table
            out.append(
                "<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>"
            )
            table = []
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)
