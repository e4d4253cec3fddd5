"""Radial basis of the edge lengths: Bessel functions, cut at the cutoff, optionally with a smooth envelope.

The published model uses e3nn's ``soft_one_hot_linspace(..., basis="bessel",
cutoff=True)``: ``sqrt(2/c) sin(n pi r / c) / r`` for ``r < c`` and 0 beyond. Each
function is 0 at ``r = c`` (``sin(n pi) = 0``), so the basis is *continuous* there, but it
is cut by a step: its derivative jumps at the cutoff (not smooth). Bond graphs of QM9
never come near 6 Å, so this does not matter for the published setting; radius graphs
and forces do feel it. ``envelope="polynomial"`` multiplies the basis by NequIP's and
MACE's polynomial cutoff (p = 6), which goes to 0 at ``r = c`` with its first and second
derivatives.
"""

from __future__ import annotations

import torch
from e3nn.math import soft_one_hot_linspace

ENVELOPES = ("none", "polynomial")


def polynomial_envelope(lengths: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` for ``x = r / cutoff < 1``, else 0.

    Klicpera et al. (DimeNet, 2020), as in NequIP's ``PolynomialCutoff``: value, first and
    second derivative vanish at the cutoff.
    """
    x = lengths / cutoff
    f = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    return f * (x < 1)


def bessel_basis(lengths: torch.Tensor, cutoff: float, num_basis: int, envelope: str = "none") -> torch.Tensor:
    """``num_basis`` Bessel functions of ``lengths`` on ``[0, cutoff]``, zero beyond, scaled by sqrt(num_basis).

    ``envelope="none"`` is the published model's radial embedding; ``"polynomial"``
    multiplies it by :func:`polynomial_envelope`. The scaling keeps the MLP input at unit size.
    """
    basis = soft_one_hot_linspace(lengths, 0.0, cutoff, num_basis, basis="bessel", cutoff=True)
    if envelope == "polynomial":
        basis = basis * polynomial_envelope(lengths, cutoff).unsqueeze(-1)
    elif envelope != "none":
        raise ValueError(f"unknown radial envelope {envelope!r}; choose one of {ENVELOPES}")
    return basis * num_basis**0.5
