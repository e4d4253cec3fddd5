"""Matplotlib figures as PNG bytes and as ``<img>`` tags with the PNG embedded (reports open offline)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def figure_png(fig: plt.Figure, dpi: int = 120, close: bool = True) -> bytes:
    """The figure as PNG bytes (closed afterwards unless ``close`` is False)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if close:
        plt.close(fig)
    return buf.getvalue()


def png_img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` element carrying ``png`` as a base64 data URI."""
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
