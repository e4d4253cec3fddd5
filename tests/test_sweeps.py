"""Sweeps: grid expansion, resume after interruption, results that match the runs, bad sweep files."""

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import run_cli
from irrepscope.errors import IrrepscopeError
from irrepscope.report.sweep import write_sweep_report
from irrepscope.sweeps import runner
from irrepscope.sweeps.spec import load_sweep
from irrepscope.training.runs import RunDir

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
    real = runner.execute_run
    calls = []

    def interrupted(spec, run_dir, threads):
        calls.append(spec.relpath)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine went away during the third run
        return real(spec, run_dir, threads)

    monkeypatch.setattr(runner, "execute_run", interrupted)
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

    from irrepscope.sweeps.summary import comparison_markdown, paired_comparisons, usage_table

    rows = [{"variant": v, "seed": s, "test_mae_ev": m} for v, s, m in
            [("a", 0, 1.0), ("a", 1, 2.0), ("a", 2, 3.5), ("b", 0, 1.5), ("b", 1, 2.1), ("b", 2, 4.5), ("c", 0, 9.0)]]  # fmt: skip
    (pair,) = paired_comparisons(rows)  # c has one seed only: no comparison
    assert (pair["a"], pair["b"], pair["seeds"], pair["a_better"]) == ("a", "b", 3, 3)
    assert pair["diff_mean"] == pytest.approx((-0.5 - 0.1 - 1.0) / 3)
    assert pair["p"] == pytest.approx(stats.ttest_rel([1, 2, 3.5], [1.5, 2.1, 4.5]).pvalue)
    usage = [{"variant": "a", "seed": s, "order": 1, "delta_mae_ev": d, "verdict": v}
             for s, d, v in [(0, 0.1, "used"), (1, 0.3, "used"), (2, 0.0, "unused"), (3, 0.01, "uncertain")]]  # fmt: skip
    (u,) = usage_table(usage)
    assert u["delta_mean"] == pytest.approx(0.41 / 4) and u["seeds"] == 4
    assert (u["used_in"], u["uncertain_in"], u["unused_in"]) == (2, 1, 1)  # how many seeds gave each verdict
    assert "| 2/1/1 |" in comparison_markdown([], usage)
    assert "relative_mean" not in u  # no model MAE recorded: no relative ΔMAE


def test_usage_comparison_pairs_variants_with_the_same_orders_by_seed():
    from scipy import stats

    from irrepscope.sweeps.summary import usage_comparisons, usage_table

    def row(variant, seed, order, delta, mae, force_delta=None, force_mae=None):
        forces = {"force_delta": force_delta, "model_force_mae": force_mae, "force_verdict": "used"} if force_mae else {}
        return {"variant": variant, "seed": seed, "order": order, "delta_mae_ev": delta, "model_mae_ev": mae,
                "verdict": "used", **forces}  # fmt: skip

    usage = [
        row("e", 0, 1, 0.2, 0.4, 0.1, 1.0), row("e", 1, 1, 0.3, 0.5, 0.0, 0.8), row("e", 2, 1, 0.1, 0.2, 0.2, 1.0),
        row("f", 0, 1, 0.4, 0.4, 0.5, 0.25), row("f", 1, 1, 0.5, 1.0, 0.3, 0.3), row("f", 2, 1, 0.3, 0.5, 0.4, 0.2),
        row("f", 0, 0, 1.0, 0.4), row("e", 0, 0, 1.0, 0.4),  # order 0: one seed only, no comparison
        row("other", 0, 1, 0.1, 0.1), row("other", 1, 1, 0.1, 0.1),  # other orders ({1} only): not compared
    ]  # fmt: skip
    by = {(u["variant"], u["order"]): u for u in usage_table(usage)}
    assert by[("e", 1)]["relative_mean"] == pytest.approx((0.5 + 0.6 + 0.5) / 3)
    assert by[("f", 1)]["force_relative_mean"] == pytest.approx((2.0 + 1.0 + 2.0) / 3)
    (c,) = usage_comparisons(usage)
    assert (c["a"], c["b"], c["order"], c["seeds"]) == ("e", "f", 1, 3)
    e, f = [0.5, 0.6, 0.5], [1.0, 0.5, 0.6]
    assert c["energy_diff_mean"] == pytest.approx(np.mean(np.subtract(e, f)))
    assert c["energy_p"] == pytest.approx(stats.ttest_rel(e, f).pvalue)
    fe, ff = [0.1, 0.0, 0.2], [2.0, 1.0, 2.0]
    assert c["force_diff_mean"] == pytest.approx(np.mean(np.subtract(fe, ff)))
    assert c["force_t"] == pytest.approx(stats.ttest_rel(fe, ff).statistic)


def test_training_times_of_different_devices_are_not_averaged_together():
    from irrepscope.sweeps.summary import summarize, summary_markdown

    def row(seed, device, secs):
        return {"variant": "a", "orders": "0 1", "hidden_mul": 4, "params": 10, "seed": seed, "test_mae_ev": 0.1,
                "test_rmse_ev": 0.2, "baseline_mae_ev": 0.9, "train_seconds": secs, "device": device}  # fmt: skip

    one = summary_markdown("s", summarize([row(0, "cpu", 1600.0), row(1, "cpu", 1700.0)]))
    assert "| 1650 |" in one
    mixed = summary_markdown("s", summarize([row(0, "cpu", 1600.0), row(1, "cuda", 70.0), row(2, "cuda", 90.0)]))
    assert "cpu: 1600 (1 run); cuda: 80 (2 runs)" in mixed
    assert "| cuda: 80 (2 runs) |" in summary_markdown("s", summarize([row(1, "cuda", 70.0), row(2, "cuda", 90.0)]))


def _one_config_sweep(tmp_path, seeds, extra_set=""):
    """A sweep of the tiny config over ``seeds``; ``extra_set`` adds lines to its ``set``."""
    path = tmp_path / "one.yaml"
    epochs = "" if "train.epochs" in extra_set else "  train.epochs: 2\n"  # a key twice is an error
    path.write_text(
        f"name: one\nconfigs:\n  - {{name: tiny, config: {ROOT}/configs/quick/tiny.yaml}}\nseeds: {seeds}\n"
        f"set:\n  data.limit: 160\n{epochs}  train.max_train_batches: 2\n{extra_set}"
    )
    return path


def test_configuration_names_sharing_a_directory_are_refused(tmp_path):
    path = tmp_path / "clash.yaml"
    path.write_text(f"name: x\nconfigs:\n  - {{name: l 01, config: {ROOT}/configs/quick/tiny.yaml}}\n"
                    f"  - {{name: l01, config: {ROOT}/configs/quick/tiny.yaml, set: {{model.orders: [0, 1]}}}}\n")  # fmt: skip
    with pytest.raises(IrrepscopeError, match="'l 01' and 'l01'") as info:
        load_sweep(path)
    assert "\n" not in str(info.value)


def test_changed_sweep_settings_are_refused_for_existing_runs(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_cli("sweep", str(_one_config_sweep(tmp_path, [0])), "--out", out, "--quiet") == 0
    relpath = load_sweep(tmp_path / "one.yaml").runs[0].relpath
    capsys.readouterr()
    changed = _one_config_sweep(tmp_path, [0], "  train.lr: 3.0e-3\n  train.batch_size: 8\n")
    assert run_cli("sweep", str(changed), "--out", out, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert relpath in err and "train.lr" in err and "train.batch_size" in err and "train.epochs" not in err
    # An older irrepscope wrote no keys added since; their legacy values are the defaults here.
    config = Path(out) / relpath / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    for key in ("warmup_epochs", "ema_decay", "plateau_patience", "plateau_factor"):
        del raw["train"][key]
    config.write_text(yaml.safe_dump(raw))
    # More epochs extend the run; device and threads are where it trains, not what it is.
    extended = _one_config_sweep(tmp_path, [0], "  train.epochs: 3\n  train.threads: 1\n  train.device: auto\n")
    assert run_cli("sweep", str(extended), "--out", out, "--quiet") == 0
    assert "1 resumed" in capsys.readouterr().out
    assert runner.run_state(Path(out) / relpath, 3) == "finished"
    # --device places every run without editing the file; finished runs stay finished.
    assert all(r.config.train.device == "auto" for r in load_sweep(extended, device="auto").runs)
    assert run_cli("sweep", str(extended), "--out", out, "--device", "cpu", "--quiet") == 0
    assert "1 finished before" in capsys.readouterr().out


def test_failed_runs_are_recorded_and_the_others_trained(tmp_path, capsys):
    path = tmp_path / "fail.yaml"
    path.write_text(
        f"name: fail\nconfigs:\n  - {{name: wild, config: {ROOT}/configs/quick/tiny.yaml, set: {{train.lr: 1.0e6}}}}\n"
        f"  - {{name: tiny, config: {ROOT}/configs/quick/tiny.yaml}}\nseeds: [0, 1]\n"
        "set:\n  data.limit: 160\n  train.epochs: 2\n  train.max_train_batches: 2\n"
    )
    sweep = load_sweep(path)
    out = tmp_path / "out"
    wild = [r for r in sweep.runs if r.config_name == "wild"]
    corrupt = next(r for r in sweep.runs if r.config_name == "tiny" and r.seed == 0)
    RunDir.at(out / corrupt.relpath).root.mkdir(parents=True)
    RunDir.at(out / corrupt.relpath).write_config(corrupt.config)
    (out / corrupt.relpath / "checkpoints").mkdir()
    (out / corrupt.relpath / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert run_cli("sweep", str(path), "--out", str(out), "--quiet") == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: 3 of 4 runs failed; their errors are in " + str(out / "results.csv")
    assert "1 trained" in captured.out and "3 failed" in captured.out
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows[corrupt.relpath]["status"] == "failed" and "corrupt checkpoint" in rows[corrupt.relpath]["error"]
    for r in wild:
        assert rows[r.relpath]["status"] == "failed" and rows[r.relpath]["error"].startswith("loss became")
    assert "| failed | corrupt checkpoint" in (out / "summary.md").read_text()
    # Fixed by hand: the next invocation retries the failed runs.
    (out / corrupt.relpath / "checkpoints" / "last.pt").unlink()
    assert run_cli("sweep", str(path), "--out", str(out), "--quiet") == 2
    captured = capsys.readouterr().out
    assert "1 finished before" in captured and "1 trained" in captured and "2 failed" in captured
    assert runner.run_status(out / corrupt.relpath, 2) == ("finished", "")


def test_two_local_workers_give_the_numbers_of_one_and_record_a_failure(tmp_path, capsys):
    path = tmp_path / "two.yaml"
    path.write_text(
        f"name: two\nconfigs:\n  - {{name: wild, config: {ROOT}/configs/quick/tiny.yaml, set: {{train.lr: 1.0e6}}}}\n"
        f"  - {{name: gapped, config: {ROOT}/configs/quick/tiny.yaml, set: {{model.orders: [0, 2]}}}}\nseeds: [0]\n"
        "set:\n  data.limit: 160\n  train.epochs: 2\n  train.max_train_batches: 2\n  train.threads: 1\n"
    )
    results = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert run_cli("sweep", str(path), "--out", str(out), "--quiet", "--workers", workers) == 2
        captured = capsys.readouterr()
        assert "1 trained" in captured.out and "1 failed" in captured.out, captured.out
        timing = {"train_seconds", "epoch_seconds", "molecules_per_s"}
        rows = [{k: v.replace(str(out), "OUT") for k, v in r.items() if k not in timing} for r in csv.DictReader((out / "results.csv").open())]
        results[workers] = rows  # the error of the failed run names its checkpoint under OUT
    assert results["2"] == results["1"]
    statuses = {r["config"]: r["status"] for r in results["2"]}
    assert statuses == {"wild": "failed", "gapped": "finished"}, statuses
