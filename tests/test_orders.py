"""Order lists, irreps and the per-order split."""

import pytest
import torch
from e3nn import o3

from irrepscope.errors import IrrepscopeError
from irrepscope.orders import hidden_irreps, invariant_norms, order_slices, sh_irreps, split_by_order, validate_orders


@pytest.mark.parametrize("orders", [[0], [0, 1, 2], [0, 3, 4, 5, 6], [0, 2, 10]])
def test_valid_orders(orders):
    assert validate_orders(orders) == orders


@pytest.mark.parametrize(
    "orders, message",
    [
        ([], "empty"),
        ([1, 2], "contain 0"),
        ([0, -1], "non-negative"),
        ([0, 1, 1], "distinct"),
        ([0, 2, 1], "sorted"),
        ([0, 1.5], "integers"),
        ([0, 13], "not supported"),
        ("012", "integers"),
    ],
)
def test_invalid_orders(orders, message):
    with pytest.raises(IrrepscopeError, match=message):
        validate_orders(orders)


def test_parities_follow_spherical_harmonics():
    assert str(sh_irreps([0, 3, 4])) == "1x0e+1x3o+1x4e"
    assert str(hidden_irreps([0, 1, 2], 8)) == "8x0e+8x1o+8x2e"


@pytest.mark.parametrize("orders, mul", [([0, 1, 2], 32), ([0, 3, 4, 5, 6], 16), ([0, 2, 7], 3)])
def test_order_slices_match_e3nn(orders, mul):
    irreps = hidden_irreps(orders, mul)
    slices = order_slices(irreps)
    assert list(slices) == orders
    for (m, ir), sl in zip(irreps, irreps.slices()):
        assert slices[ir.l] == sl
        # H * (2l + 1) columns, not H: the original analysis's mistake.
        assert sl.stop - sl.start == m * (2 * ir.l + 1)


def test_split_by_order_layout_and_invariance():
    irreps = hidden_irreps([0, 1, 3], 5)
    x = irreps.randn(7, -1)
    blocks = split_by_order(x, irreps)
    assert blocks[0].shape == (7, 5, 1) and blocks[1].shape == (7, 5, 3) and blocks[3].shape == (7, 5, 7)
    # copy u of order 1 sits at columns 5 + 3u .. 5 + 3u + 3
    assert torch.equal(blocks[1][:, 2], x[:, 5 + 6 : 5 + 9])
    R = o3.rand_matrix()
    rotated = split_by_order(x @ irreps.D_from_matrix(R).T, irreps)
    for l in (0, 1, 3):
        assert torch.allclose(invariant_norms(blocks[l]), invariant_norms(rotated[l]), atol=1e-5)


def test_split_by_order_rejects_wrong_width():
    with pytest.raises(IrrepscopeError, match="columns"):
        split_by_order(torch.zeros(2, 5), hidden_irreps([0, 1], 2))
