"""Radial basis of the edge lengths: Bessel functions with e3nn's smooth cutoff."""

from __future__ import annotations

import torch
from e3nn.math import soft_one_hot_linspace


def bessel_basis(lengths: torch.Tensor, cutoff: float, num_basis: int) -> torch.Tensor:
    """``num_basis`` Bessel functions of ``lengths`` on ``[0, cutoff]``, smoothly cut off, scaled by sqrt(num_basis).

    This is the published model's radial embedding (e3nn's ``soft_one_hot_linspace``
    with ``basis="bessel", cutoff=True``); the scaling keeps the MLP input at unit size.
    """
    basis = soft_one_hot_linspace(lengths, 0.0, cutoff, num_basis, basis="bessel", cutoff=True)
    return basis * num_basis**0.5
