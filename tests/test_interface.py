"""The analysis talks to models through one interface; our own model's numbers did not change with it."""

import json
import math
import shutil
from pathlib import Path

import pytest

from irrepscope.api import analyze_run

DATA = Path(__file__).parent / "data"


def _close(a, b, path="usage"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        # The probes' targets are now read in float64 (before: the batch's float32 copy): R^2 moves by ~1e-7;
        # float32 energies of tens of eV resolve ~4e-6 eV, and thread counts reorder their sums (CI's 2 cores vs 1).
        tolerance = (
            dict(abs=1e-6) if path.endswith("probe_r2")
            else dict(rel=1e-5, abs=2e-5) if path.endswith("ablation_delta_mae_ev")
            else dict(rel=1e-6, abs=1e-9)
        )  # fmt: skip
        assert b == pytest.approx(a, **tolerance), path
    else:
        assert a == b, path


def test_our_models_analysis_is_unchanged_by_the_redesign(tmp_path):
    """tests/data/legacy_run_analysis.json was written by the analysis before the model interface existed."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "legacy_run", run)
    options = dict(embedding="pca", map_molecules=30, probe_molecules=100, progress=False)
    now = analyze_run(run, ablation_molecules=25, **options)
    before = json.loads((DATA / "legacy_run_analysis.json").read_text())
    assert now["family"] == "irrepscope"  # added by the redesign; every number from before must be unchanged
    now = {k: v for k, v in now.items() if k in before}
    now = json.loads(json.dumps(now))
    # The per-block ablations and grad x input were measured on every molecule then, on the ablation subset now
    # (the all-blocks one's, 25 here): on every molecule (no subset) they are what they were.
    whole = json.loads(json.dumps(analyze_run(run, ablation_molecules=None, **options)))
    per_block = ("ablation_delta_mae_ev", "ablation_delta_rel", "grad_x_input", "verdict")
    for row, full in zip(now["rows"], whole["rows"], strict=True):
        if row["block"] != "all":
            row.update({k: v for k, v in full.items() if k.startswith(per_block)})
    for row, old in zip(now["rows"], before["rows"], strict=True):
        # columns added with force fields: empty for structures without forces
        assert row.pop("force_delta_mae") is None and row.pop("force_verdict") == ""
        assert [row.pop(k) for k in ("energy_change_per_atom", "force_change", "force_change_rel")] == [None] * 3
        # intervals, added with the verdicts that say how sure they are: each holds its value
        for key in [k for k in row if k.endswith(("_lo", "_hi"))]:
            bound, value = row.pop(key), row.get(key[:-3])
            if bound is not None and value is not None:
                assert (bound <= value + 1e-12) if key.endswith("_lo") else (bound >= value - 1e-12), key
        for key in ("force_delta_rel",):
            assert row.pop(key) is None
        rel = row.pop("ablation_delta_rel")
        # the old point verdict is the new verdict's point estimate; the interval may leave it uncertain
        if old["verdict"] != "absent":
            assert (rel >= before["threshold"]) == (old["verdict"] == "used")
            assert row["verdict"] in (old["verdict"], "uncertain")
            row["verdict"] = old["verdict"]
    now.pop("uncertain_orders", None)
    assert now["threshold_rule"].startswith(before["threshold_rule"])  # extended by the interval rule
    now["threshold_rule"] = before["threshold_rule"]
    _close(before, now)


def test_generic_ablation_path_equals_the_linear_shortcut(qm9):
    """A family without the linear shortcut re-runs the model per (block, order): same numbers for our model."""
    import numpy as np
    import torch

    from irrepscope.analysis.features import collect
    from irrepscope.analysis.own_model import OwnModel
    from irrepscope.config import ModelConfig
    from irrepscope.model.network import build_model

    class Rerun(OwnModel):
        linear_in_features = False

        def all_blocks_ablation(self, batch, orders):  # the interface's generic re-run, not the restricted blocks
            return {l: self.ablation(batch, None, l) for l in orders}

    torch.manual_seed(0)
    model = build_model(ModelConfig(orders=[0, 2, 3], hidden_mul=3, num_blocks=3)).double().eval()
    model.set_target_stats(-70.0, 10.0)
    idx = np.arange(200, 230)
    fast = collect(OwnModel(model), qm9, idx, target="U0_atomization", batch_size=8)
    slow = collect(Rerun(model), qm9, idx, target="U0_atomization", batch_size=8)
    np.testing.assert_allclose(slow.ablation_prediction, fast.ablation_prediction, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(slow.grad_x_input, fast.grad_x_input, rtol=1e-12)
    assert np.abs(fast.ablation_prediction - fast.prediction).max() > 1e-6  # the ablations do something
