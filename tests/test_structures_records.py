"""QM9 energy runs give the same numbers after the structures redesign as before it.

tests/data/pre_structures/ holds records written by irrepscope at commit d9b66cb (before
QM9 became one source of the generic ``Structures``): two tiny runs (bond graph; radius
graph with the polynomial envelope), their split, metrics, test.json and a small analysis.
Retraining them with today's code must reproduce every number.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import irrepscope as irs
from irrepscope.config import load_config
from irrepscope.data.split import load_split
from irrepscope.training.trainer import train

RECORDS = Path(__file__).parent / "data" / "pre_structures"


@pytest.mark.parametrize("name", ["tiny", "tiny_radius"])
def test_qm9_runs_reproduce_records_of_the_old_code(name, tmp_path, qm9):
    record = RECORDS / name
    config = load_config(record / "config.yaml", run_record=True)
    test = train(config, tmp_path / name, progress=False)
    old = json.loads((record / "test.json").read_text())
    for key in ("mae_ev", "rmse_ev", "baseline_mae_ev", "baseline_rmse_ev", "n", "epoch", "params"):
        assert test[key] == pytest.approx(old[key], rel=1e-6, abs=1e-9), key
    new_split, old_split = load_split(tmp_path / name / "split.json"), load_split(record / "split.json")
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(new_split[part], old_split[part])
    with open(record / "metrics.csv") as f:
        old_rows = list(csv.DictReader(f))
    with open(tmp_path / name / "metrics.csv") as f:
        new_rows = list(csv.DictReader(f))
    for a, b in zip(old_rows, new_rows, strict=True):
        for key, value in a.items():
            assert float(b[key]) == pytest.approx(float(value), rel=1e-5), (a["epoch"], key)

    run = irs.load_run(tmp_path / name, mols=qm9)
    result = irs.analyze(
        run, max_molecules=40, embedding="pca", map_molecules=30, probe_molecules=60, ablation_molecules=40, progress=False
    )
    before = json.loads((record / "usage_small.json").read_text())
    assert result["model_mae"] == pytest.approx(before["model_mae"], rel=1e-6)
    assert result["baseline_mae"] == pytest.approx(before["baseline_mae"], rel=1e-9)
    # verdicts now read intervals: the old point verdict is the new one's point estimate, or it is uncertain
    assert set(result["unused_orders"]) <= set(before["unused_orders"])
    for new, old_row in zip(result["rows"], before["rows"], strict=True):
        assert (new["block"], new["order"]) == (old_row["block"], old_row["order"])
        assert new["verdict"] in (old_row["verdict"], "uncertain")
        if old_row["verdict"] != "absent":
            assert (new["ablation_delta_rel"] >= result["threshold"]) == (old_row["verdict"] == "used")
        for key in ("ablation_delta_mae_ev", "norm_share_node", "norm_share_graph", "grad_x_input", "probe_r2"):
            if old_row[key] is None or np.isnan(old_row[key]):
                continue
            # float32 predictions of energies of tens of eV resolve about 4e-6 eV (thread counts reorder sums)
            tol = 2e-5 if key == "ablation_delta_mae_ev" else 1e-6 if key == "probe_r2" else 1e-7
            assert new[key] == pytest.approx(old_row[key], rel=1e-5, abs=tol), (new["block"], new["order"], key)
