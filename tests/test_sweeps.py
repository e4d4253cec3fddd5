"""Sweeps: grid expansion, resume after interruption, results that match the runs, bad sweep files."""

import csv
import json
from pathlib import Path

import pytest

from helpers import run_cli
from irrepscope.errors import IrrepscopeError
from irrepscope.report.sweep import write_sweep_report
from irrepscope.sweeps import runner
from irrepscope.sweeps.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = f"""
name: mini
configs:
  - {{config: {ROOT}/configs/quick/tiny.yaml}}
  - {{name: gapped, config: {ROOT}/configs/quick/tiny.yaml, set: {{model.orders: [0, 2]}}}}
seeds: [0, 1]
set:
  data.limit: 160
  train.epochs: 2
  train.max_train_batches: 2
"""


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(SWEEP)
    return path


def test_grid_expansion(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(SWEEP + "grid:\n  train.lr: [1.0e-3, 2.0e-3]\n")
    sweep = load_sweep(path)
    assert len(sweep.runs) == 2 * 2 * 2
    assert len({r.relpath for r in sweep.runs}) == 8
    assert {r.config.train.lr for r in sweep.runs} == {1e-3, 2e-3}
    assert {tuple(r.config.model.orders) for r in sweep.runs} == {(0, 1, 2), (0, 2)}


def test_shipped_sweeps_are_valid():
    for name in ("paper_table1", "paper_table2", "cpu_table2"):
        sweep = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
        assert len(sweep.runs) >= 3


def test_resume_after_interruption_repeats_nothing(sweep_file, monkeypatch):
    sweep = load_sweep(sweep_file)
    out = sweep_file.parent / "out"
    real = runner._execute
    calls = []

    def interrupted(spec, run_dir, threads):
        calls.append(spec.relpath)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine went away during the third run
        return real(spec, run_dir, threads)

    monkeypatch.setattr(runner, "_execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(sweep, out, progress=False)
    finished = [r for r in sweep.runs if runner.run_state(out / r.relpath, 2) == "finished"]
    assert len(finished) == 2
    stamps = {r.relpath: (out / r.relpath / "checkpoints" / "last.pt").stat().st_mtime_ns for r in finished}

    calls.clear()
    counts = runner.run_sweep(sweep, out, progress=False)
    assert counts["finished before"] == 2 and counts.get("trained") == 2
    assert sorted(calls) == sorted(r.relpath for r in sweep.runs if r.relpath not in stamps)
    for relpath, stamp in stamps.items():  # finished runs were not touched
        assert (out / relpath / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp

    # results.csv matches each run's own test.json
    write_sweep_report(sweep, out)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    for row in rows:
        test = json.loads((out / row["run"] / "test.json").read_text())
        assert float(row["test_mae_ev"]) == pytest.approx(test["mae_ev"], rel=1e-12)
        assert int(row["params"]) == test["params"]
    assert "±" in (out / "summary.md").read_text()
    assert "data:image/png;base64," in (out / "summary.html").read_text()


def test_partial_run_is_resumed(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file)
    out = tmp_path / "out"
    first = sweep.runs[0]
    # A run that stopped after its first epoch.
    assert run_cli("train", str(ROOT / "configs/quick/tiny.yaml"), "--out", str(out / first.relpath), "--quiet",
                     "--set", "data.limit=160", "--set", "train.epochs=1", "--set", "train.max_train_batches=2") == 0  # fmt: skip
    (out / first.relpath / "test.json").unlink()
    assert runner.run_state(out / first.relpath, 2) == "partial"
    counts = runner.run_sweep(load_sweep(sweep_file).__class__(sweep.name, sweep.path, [first]), out, progress=False)
    assert counts == {"finished before": 0, "resumed": 1}
    assert runner.run_state(out / first.relpath, 2) == "finished"


@pytest.mark.parametrize(
    "text, match",
    [
        ("name: x\nconfigs: []\n", "non-empty"),
        ("name: x\nconfigs:\n  - {config: nowhere.yaml}\n", "not found"),
        ("name: x\nconfig: []\n", "unknown sweep key"),
        ("name: x\nconfigs:\n  - {name: a, sett: {}}\n", "unknown key"),
        ("name: x\nconfigs:\n  - {name: a}\nseeds: []\n", "seeds"),
        ("name: x\nconfigs:\n  - {name: a, set: {model.orders: [1]}}\n", "must contain 0"),
        ("name: x\nconfigs:\n  - {name: a}\ngrid:\n  train.lr: []\n", "grid"),
        ("name: [x\n", "malformed"),
    ],
)
def test_bad_sweep_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(IrrepscopeError, match=match):
        load_sweep(path)


def test_sweep_analyze_gives_usage_and_paired_comparisons(sweep_file, capsys):
    out = sweep_file.parent / "out"
    assert run_cli("sweep", str(sweep_file), "--out", str(out), "--quiet", "--analyze") == 0
    assert "4 analysed" in capsys.readouterr().out
    sweep = load_sweep(sweep_file)
    for spec in sweep.runs:
        assert (out / spec.relpath / "analysis" / "usage.json").is_file()
    # runs are trained seed by seed
    assert [r.seed for r in sweep.runs] == [0, 0, 1, 1]
    rows = list(csv.DictReader((out / "results.csv").open()))
    for row in rows:
        test = json.loads((out / row["run"] / "test.json").read_text())
        assert float(row["baseline_mae_ev"]) == pytest.approx(test["baseline_mae_ev"], rel=1e-12)
        assert row["reference"] == "per_element"
    summary = (out / "summary.md").read_text()
    assert "Paired comparisons" in summary and "Order usage" in summary and "composition baseline" in summary
    # a second call analyses nothing again
    assert run_cli("sweep", str(sweep_file), "--out", str(out), "--quiet", "--analyze") == 0
    assert "0 analysed" in capsys.readouterr().out


def test_paired_comparison_and_usage_table_on_known_numbers():
    from scipy import stats

    from irrepscope.sweeps.summary import paired_comparisons, usage_table

    rows = [{"variant": v, "seed": s, "test_mae_ev": m} for v, s, m in
            [("a", 0, 1.0), ("a", 1, 2.0), ("a", 2, 3.5), ("b", 0, 1.5), ("b", 1, 2.1), ("b", 2, 4.5), ("c", 0, 9.0)]]  # fmt: skip
    (pair,) = paired_comparisons(rows)  # c has one seed only: no comparison
    assert (pair["a"], pair["b"], pair["seeds"], pair["a_better"]) == ("a", "b", 3, 3)
    assert pair["diff_mean"] == pytest.approx((-0.5 - 0.1 - 1.0) / 3)
    assert pair["p"] == pytest.approx(stats.ttest_rel([1, 2, 3.5], [1.5, 2.1, 4.5]).pvalue)
    usage = [{"variant": "a", "seed": s, "order": 1, "delta_mae_ev": d, "verdict": v}
             for s, d, v in [(0, 0.1, "used"), (1, 0.3, "used"), (2, 0.0, "unused")]]  # fmt: skip
    (u,) = usage_table(usage)
    assert u["delta_mean"] == pytest.approx(0.4 / 3) and u["delta_std"] == pytest.approx(0.15275252, rel=1e-6)
    assert u["unused_in"] == 1
