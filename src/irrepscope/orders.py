"""Order lists and the irreps built from them: the one place that knows how orders map to columns.

An *order list* is a sorted list of distinct non-negative integers that contains 0,
e.g. ``[0, 1, 2]`` or the gapped ``[0, 3, 4, 5, 6]``. Order ``l`` always carries parity
``(-1)**l`` (0e, 1o, 2e, 3o, ...), as spherical harmonics of a bond vector do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from e3nn import o3

from irrepscope.errors import IrrepscopeError, shorten

MAX_ORDER = 12


def validate_orders(orders: Iterable[int]) -> list[int]:
    """Return ``orders`` as a list of ints, or raise a clear error if it is not a valid order list."""
    try:
        values = list(orders)
    except TypeError:
        raise IrrepscopeError(f"orders must be a list of integers, got {shorten(orders)}") from None
    if not values:
        raise IrrepscopeError("orders must not be empty; it must contain at least 0")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise IrrepscopeError(f"orders must be integers, got {shorten(v)} in {shorten(values)}")
    if any(v < 0 for v in values):
        raise IrrepscopeError(f"orders must be non-negative, got {shorten(values)}")
    if len(set(values)) != len(values):
        raise IrrepscopeError(f"orders must be distinct, got duplicates in {shorten(values)}")
    if values != sorted(values):
        raise IrrepscopeError(f"orders must be sorted ascending, got {shorten(values)}")
    if 0 not in values:
        raise IrrepscopeError(f"orders must contain 0 (a scalar target needs l=0 features), got {shorten(values)}")
    if max(values) > MAX_ORDER:
        raise IrrepscopeError(f"orders above {MAX_ORDER} are not supported, got {shorten(values)}")
    return values


def parity(l: int) -> int:
    """Parity of order ``l`` as used throughout irrepscope: ``(-1)**l``."""
    return 1 if l % 2 == 0 else -1


def sh_irreps(orders: Sequence[int]) -> o3.Irreps:
    """Irreps of the edge spherical harmonics for ``orders``: ``1x0e + 1x1o + ...``."""
    return o3.Irreps([(1, (l, parity(l))) for l in orders])


def hidden_irreps(orders: Sequence[int], mul: int) -> o3.Irreps:
    """Irreps of the hidden node features: ``mul`` copies of every order in the list."""
    return o3.Irreps([(mul, (l, parity(l))) for l in orders])


def order_slices(irreps: o3.Irreps | str) -> dict[int, slice]:
    """Column range of each order in a feature tensor laid out by ``irreps``.

    Order ``l`` with multiplicity ``H`` spans ``H * (2l + 1)`` columns (not ``H``: that
    was the original analysis's mistake). Several entries of one order are merged when
    they are adjacent; a non-contiguous order raises.
    """
    irreps = o3.Irreps(irreps)
    out: dict[int, slice] = {}
    for (mul, ir), sl in zip(irreps, irreps.slices()):
        if ir.l in out:
            prev = out[ir.l]
            if prev.stop != sl.start:
                raise IrrepscopeError(f"order {ir.l} is not contiguous in {irreps}")
            sl = slice(prev.start, sl.stop)
        out[ir.l] = sl
    return out


def split_by_order(features: torch.Tensor, irreps: o3.Irreps | str) -> dict[int, torch.Tensor]:
    """Split ``features[..., irreps.dim]`` into per-order blocks of shape ``[..., H, 2l+1]``.

    The reshape follows e3nn's layout (multiplicity-major: copy ``u`` of order ``l``
    occupies columns ``u*(2l+1) : (u+1)*(2l+1)`` of that order's block).
    """
    irreps = o3.Irreps(irreps)
    if features.shape[-1] != irreps.dim:
        raise IrrepscopeError(f"features have {features.shape[-1]} columns but {irreps} has dimension {irreps.dim}")
    blocks = {}
    for l, sl in order_slices(irreps).items():
        block = features[..., sl]
        blocks[l] = block.reshape(*features.shape[:-1], -1, 2 * l + 1)
    return blocks


def invariant_norms(block: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant summary of an order block ``[..., H, 2l+1]``: the norm of each copy ``[..., H]``."""
    return block.norm(dim=-1)


def tensor_product_weights(in_orders: Sequence[int], mul_in: int, orders: Sequence[int], mul_out: int) -> int:
    """Weights of e3nn's fully connected product ``mul_in x in_orders  x  Y(orders) -> mul_out x orders``.

    A path ``l1 x l2 -> l3`` exists when ``|l1 - l2| <= l3 <= l1 + l2`` and the parities
    match (``l1 + l2 + l3`` even, every order having parity ``(-1)**l``); each holds
    ``mul_in * mul_out`` weights.
    """
    paths = sum(
        1 for l1 in in_orders for l2 in orders for l3 in orders if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0
    )
    return paths * mul_in * mul_out
