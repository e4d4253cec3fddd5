"""Pruning never removes order 0 and never produces an invalid order list."""

import itertools
import json

import pytest

from irrepscope.errors import IrrepscopeError
from irrepscope.orders import validate_orders
from irrepscope.sweeps.prune import pruned_config, pruned_orders


@pytest.mark.parametrize("orders", [[0], [0, 1, 2], [0, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
def test_every_subset_prunes_to_a_valid_list_with_zero(orders):
    for k in range(len(orders) + 1):
        for unused in itertools.combinations(orders, k):
            result = pruned_orders(orders, list(unused))
            assert validate_orders(result) == result
            assert 0 in result
            assert set(result) == {0} | (set(orders) - set(unused))


def test_examples():
    assert pruned_orders([0, 1, 2, 3, 4], [1, 2]) == [0, 3, 4]
    assert pruned_orders([0, 1, 2], [0, 1, 2]) == [0]


def test_unknown_order_is_an_error():
    with pytest.raises(IrrepscopeError, match="has only"):
        pruned_orders([0, 1, 2], [5])


def test_pruned_config_keeps_budget_and_seed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  orders: [0, 1, 2, 3]\ntrain:\n  epochs: 7\n  seed: 4\ndata:\n  limit: 500\n")
    cfg = pruned_config(run, {"unused_orders": [1, 2]})
    assert cfg.model.orders == [0, 3] and cfg.train.epochs == 7 and cfg.train.seed == 4 and cfg.data.limit == 500
    (run / "analysis").mkdir()
    (run / "analysis" / "usage.json").write_text(json.dumps({"orders": [0, 1]}))
    from irrepscope.sweeps.prune import read_usage

    with pytest.raises(IrrepscopeError, match="unused_orders"):
        read_usage(run)
