"""Usage verdicts that say how sure they are: bootstrap intervals through the whole analysis, on cases with a known answer.

The bootstrap itself (coverage, pairing, zero width) is tested in test_bootstrap.py; here
the analysis of a real model carries it: a planted order whose effect is known in kind.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import scale_order_paths
from irrepscope.analysis.features import collect
from irrepscope.analysis.own_model import OwnModel
from irrepscope.analysis.runner import analyze_model
from irrepscope.config import ModelConfig
from irrepscope.model.network import build_model
from irrepscope.sweeps.prune import decide_at

TRAIN = np.arange(0, 200)
EVAL = np.arange(20000, 23000)
KW = dict(target="U0_atomization", embedding="pca", map_molecules=10, probe_molecules=10, ablation_molecules=None, progress=False)


def scaled_order(l: int, factor: float) -> torch.nn.Module:
    """A fresh [0, 1, 2] model (3 blocks, float64) whose paths reading or writing order ``l`` are scaled by ``factor``."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(orders=[0, 1, 2], hidden_mul=4, num_blocks=3)).double().eval()
    model.set_target_stats(-70.0, 10.0)
    scale_order_paths(model, l, factor)
    return model


@pytest.fixture(scope="module")
def planted(qm9):
    """Order 2 with a small real effect: the target is the model's own prediction plus 0.05 eV of noise, so the
    model's MAE is that noise and zeroing the (down-scaled) l = 2 paths adds about 3 % to it."""
    model = scaled_order(2, 0.15)
    known = np.concatenate([TRAIN, EVAL])
    prediction = collect(OwnModel(model), qm9, known, target=None, gradients=False, batch_size=256).prediction
    target = qm9.properties["U0_atomization"].copy()
    target[known] = prediction + np.random.default_rng(0).normal(0.0, 0.05, len(known))
    return model, dataclasses.replace(qm9, properties={**qm9.properties, "U0_atomization": target})


def _all_row(result, l):
    return next(r for r in result["rows"] if r["block"] == "all" and r["order"] == l)


def test_a_small_real_effect_is_uncertain_on_few_molecules_and_used_on_many(planted):
    model, mols = planted
    few, many = (analyze_model(model, mols, EVAL[:n], TRAIN, **KW) for n in (20, 3000))
    small, large = _all_row(few, 2), _all_row(many, 2)
    assert 0.01 < large["ablation_delta_rel_lo"] and large["ablation_delta_rel"] < 0.1  # small, and real
    assert large["verdict"] == "used"
    assert small["ablation_delta_rel_lo"] < 0.01 <= small["ablation_delta_rel_hi"]
    assert small["verdict"] == "uncertain"
    assert few["uncertain_orders"] == [2] and 2 not in few["unused_orders"]  # kept: not pruned on a coin toss
    # the interval narrows like 1/sqrt(n)
    width = lambda r: r["ablation_delta_rel_hi"] - r["ablation_delta_rel_lo"]  # noqa: E731
    assert width(small) > 4 * width(large)
    # prune's re-decision reads the same intervals
    assert decide_at(few, 0.01) == ([], [2])
    assert decide_at(many, 0.01) == ([], [])


def test_an_order_with_zeroed_path_weights_is_unused_with_an_interval_of_zero_width(qm9):
    result = analyze_model(scaled_order(2, 0.0), qm9, EVAL[:60], TRAIN, **KW)
    rows = [r for r in result["rows"] if r["order"] == 2 and r["verdict"] != "absent"]
    assert len(rows) == 4  # 3 blocks and "all"
    for r in rows:
        for key in ("ablation_delta_mae_ev", "ablation_delta_rel"):
            # zero to float64 rounding (the all-blocks ablation re-runs the blocks by another code path)
            for value in (r[key], r[f"{key}_lo"], r[f"{key}_hi"]):
                assert value == pytest.approx(0.0, abs=1e-12), (r["block"], key)
        assert r["verdict"] == "unused"
    assert 2 in result["unused_orders"] and 2 not in result["uncertain_orders"]


def test_the_seed_makes_the_intervals_reproducible(qm9):
    model = scaled_order(2, 1.0)
    runs = [analyze_model(model, qm9, EVAL[:40], TRAIN, seed=s, **KW) for s in (0, 0, 1)]
    same, again, other = (json.dumps(r["rows"], sort_keys=True) for r in runs)
    assert same == again
    assert same != other
    assert runs[0]["intervals"] == runs[1]["intervals"]
    # every interval holds its value, and MAEs come with theirs
    for r in runs[0]["rows"]:
        for key in [k for k in r if k.endswith("_lo")]:
            value, lo, hi = r[key[:-3]], r[key], r[f"{key[:-3]}_hi"]
            if np.isfinite(value) and np.isfinite(lo):
                assert lo - 1e-12 <= value <= hi + 1e-12 or key.startswith("probe"), (r["block"], r["order"], key)
    lo, hi = runs[0]["intervals"]["model_mae"]
    assert lo <= runs[0]["model_mae"] <= hi
    lo, hi = runs[0]["intervals"]["mae_ratio_to_baseline"]
    assert lo <= runs[0]["mae_ratio_to_baseline"] <= hi
