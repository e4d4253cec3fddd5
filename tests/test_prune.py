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


def test_unused_at_threshold():
    from irrepscope.sweeps.prune import unused_at

    usage = {
        "model_mae": 2.0,
        "rows": [
            {"block": "all", "order": 0, "ablation_delta_mae_ev": 0.0},
            {"block": "all", "order": 1, "ablation_delta_mae_ev": 0.05},
            {"block": "all", "order": 2, "ablation_delta_mae_ev": 0.5},
            {"block": 1, "order": 2, "ablation_delta_mae_ev": 0.0},
            {"block": "all", "order": 3, "ablation_delta_mae_ev": -0.1},
        ],
    }
    assert unused_at(usage, 0.01) == [3]  # 1 % of 2 eV = 0.02 eV; order 0 never
    assert unused_at(usage, 0.05) == [1, 3]
    with pytest.raises(IrrepscopeError):
        unused_at(usage, -1)


def test_least_used_prunes_exactly_the_smallest_ablation_effect():
    from irrepscope.sweeps.prune import least_used

    rows = [{"block": "all", "order": l, "ablation_delta_mae_ev": d} for l, d in [(0, 0.0), (1, 0.3), (2, 0.05), (3, 2.0)]]
    rows.append({"block": 1, "order": 3, "ablation_delta_mae_ev": -5.0})  # a per-block row must not count
    assert least_used({"rows": rows}) == [2]
    with pytest.raises(IrrepscopeError, match="no order besides 0"):
        least_used({"rows": rows[:1]})


def test_pruning_a_force_field_weighs_the_forces():
    """An order unused for the energy but used for the forces is not pruned, by any of the three rules."""
    from irrepscope.analysis.usage import decide_orders
    from irrepscope.sweeps.prune import least_used, unused_at

    def row(l, de, df, fv):
        return {"block": "all", "order": l, "ablation_delta_mae_ev": de, "verdict": "unused" if de < 0.001 else "used",
                "force_delta_mae": df, "force_verdict": fv}  # fmt: skip

    rows = [row(0, 1.0, 1.0, "used"), row(1, 0.0, 0.2, "used"), row(2, 0.0, 0.0, "unused"), row(3, 0.05, 0.001, "used")]
    usage = {"rows": rows, "model_mae": 0.1, "ablation_model_mae": 0.1, "force_mae": 0.3}
    assert decide_orders([0, 1, 2, 3], rows)[0] == [2]
    assert unused_at(usage, 0.01) == [2]
    assert least_used(usage) == [2]
    rows[2]["force_delta_mae"], rows[2]["force_verdict"] = 0.5, "used"  # now l = 2 matters for the forces
    assert decide_orders([0, 1, 2, 3], rows)[0] == [] and unused_at(usage, 0.01) == []
    assert least_used(usage) == [3]  # max(0.05/0.1, 0.001/0.3) = 0.5 < l=1's 0.2/0.3 and l=2's 0.5/0.3
