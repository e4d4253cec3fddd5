"""Training, resuming, evaluating and predicting, through the CLI as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.io import write

from helpers import one_line_error, run_cli as cli
from irrepscope.training.runs import RunDir, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "quick" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli("train", TINY, "--out", str(out), "--quiet", "--set", "train.epochs=3") == 0
    return out


def test_run_directory_contents(trained):
    run = RunDir.at(trained)
    for path in (run.config, run.split, run.metrics, run.test, run.checkpoint("best"), run.checkpoint("last")):
        assert path.is_file(), path
    test = json.loads(run.test.read_text())
    assert {"mae_ev", "rmse_ev", "n"} <= set(test) and test["n"] == 40
    state = load_checkpoint(run.checkpoint("last"))
    assert state["epoch"] == 3 and state["config"]["model"]["orders"] == [0, 1, 2]


def test_training_lowers_the_loss(trained):
    rows = RunDir.at(trained).read_metrics()
    assert len(rows) == 3
    # The tiny config subtracts per-element references: what is left to learn is the hard part.
    assert float(rows[-1]["train_loss"]) < 0.9 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_mae_mev"]) < float(rows[0]["val_mae_mev"])


def test_evaluate_reproduces_test_json(trained, capsys):
    before = json.loads(RunDir.at(trained).test.read_text())
    assert cli("evaluate", str(trained)) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["mae_ev"] == pytest.approx(before["mae_ev"], rel=1e-6)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["--quiet", "--set", "train.max_train_batches=6"]
    assert cli("train", TINY, "--out", str(full), *common) == 0
    assert cli("train", TINY, "--out", str(cut), *common, "--set", "train.epochs=1") == 0
    assert cli("train", "--resume", str(cut), "--quiet", "--set", "train.epochs=2") == 0
    a = load_checkpoint(RunDir.at(full).checkpoint("last"))
    b = load_checkpoint(RunDir.at(cut).checkpoint("last"))
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:  # equal up to the order of threaded float sums
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    rows_a, rows_b = RunDir.at(full).read_metrics(), RunDir.at(cut).read_metrics()
    assert [r["val_mae_mev"] for r in rows_a] == [r["val_mae_mev"] for r in rows_b]


def test_predict_xyz(trained, tmp_path, capsys):
    path = tmp_path / "mols.xyz"
    methane = Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    write(path, [methane, water])
    assert cli("predict", str(trained), str(path), "--json") == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["formula"] for r in results] == ["CH4", "H2O"]
    assert all(r["unit"] == "eV" and isinstance(r["prediction"], float) for r in results)


def test_info_json(capsys):
    assert cli("info", str(ROOT / "configs" / "paper" / "l03456_h16.yaml"), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["orders"] == [0, 3, 4, 5, 6] and info["irreps"] == "16x0e+16x3o+16x4e+16x5o+16x6e"
    assert info["params"] == 827_216


# -- bad input: one line on stderr, exit status 2, nothing already written is damaged -----


@pytest.mark.parametrize(
    "text, match",
    [
        ("model: [oops\n", "malformed YAML"),
        ("model:\n  lmax: 3\n", "unknown key model.lmax"),
        ("model:\n  orders: [1, 2]\n", "must contain 0"),
        ("model:\n  orders: [0, -2]\n", "non-negative"),
        ("model:\n  orders: [0, 2, 2]\n", "distinct"),
    ],
)
def test_bad_config(tmp_path, capsys, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    one_line_error(capsys, cli("train", str(path), "--out", str(tmp_path / "run")), match)
    assert not (tmp_path / "run").exists()


def test_unknown_element(trained, tmp_path, capsys):
    path = tmp_path / "s.xyz"
    write(path, Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]]))
    one_line_error(capsys, cli("predict", str(trained), str(path)), "S")
    bogus = tmp_path / "x.xyz"
    bogus.write_text("2\n\nXx 0 0 0\nH 0 0 1\n")
    one_line_error(capsys, cli("predict", str(trained), str(bogus)), "x.xyz")


def test_missing_and_corrupt_checkpoint(trained, tmp_path, capsys):
    one_line_error(capsys, cli("evaluate", str(tmp_path / "nowhere")), "not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((trained / "config.yaml").read_text())
    (broken / "split.json").write_text((trained / "split.json").read_text())
    one_line_error(capsys, cli("evaluate", str(broken)), "checkpoint not found")
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints" / "best.pt").write_bytes(b"definitely not a checkpoint")
    (broken / "test.json").write_text('{"mae_ev": 1.0}\n')
    one_line_error(capsys, cli("evaluate", str(broken)), "corrupt checkpoint")
    assert (broken / "test.json").read_text() == '{"mae_ev": 1.0}\n'


def test_train_refuses_to_overwrite_a_run(trained, capsys):
    before = (trained / "checkpoints" / "best.pt").read_bytes()
    one_line_error(capsys, cli("train", TINY, "--out", str(trained)), "already holds a run")
    assert (trained / "checkpoints" / "best.pt").read_bytes() == before


def test_nan_loss_is_a_clear_error(tmp_path, capsys):
    code = cli("train", TINY, "--out", str(tmp_path / "nan"), "--quiet", "--set", "train.lr=1e12", "--set", "train.epochs=3")
    one_line_error(capsys, code, "loss became")


def test_console_script_exit_status(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  orders: [3]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "irrepscope", "info", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


# -- resume keeps the run's record and recipe ---------------------------------------------------


def test_a_kill_between_checkpoint_and_metrics_loses_no_row(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["--quiet", "--set", "train.max_train_batches=4"]
    assert cli("train", TINY, "--out", str(full), *common) == 0
    real = RunDir.write_metrics

    def killed(self, rows):
        if len(rows) == 2:  # last.pt of epoch 2 is on disk; the process dies before the row is
            raise KeyboardInterrupt
        real(self, rows)

    monkeypatch.setattr(RunDir, "write_metrics", killed)
    assert cli("train", TINY, "--out", str(cut), *common) != 0  # the CLI reports the interrupt
    assert load_checkpoint(RunDir.at(cut).checkpoint("last"))["epoch"] == 2
    assert len(RunDir.at(cut).read_metrics()) == 1
    monkeypatch.setattr(RunDir, "write_metrics", real)
    assert cli("train", "--resume", str(cut), "--quiet") == 0
    rows_full, rows_cut = RunDir.at(full).read_metrics(), RunDir.at(cut).read_metrics()
    assert [r["epoch"] for r in rows_cut] == ["1", "2"]
    assert [r["val_mae_mev"] for r in rows_cut] == [r["val_mae_mev"] for r in rows_full]


@pytest.mark.parametrize("override", ["train.lr=0.5", "train.batch_size=8", "train.seed=7", "train.ema_decay=0.9", "train.epochs=1"])
def test_resume_refuses_a_changed_recipe(trained, capsys, override):
    before = (trained / "config.yaml").read_text()
    one_line_error(capsys, cli("train", "--resume", str(trained), "--set", override), "cannot resume")
    assert (trained / "config.yaml").read_text() == before


def test_extending_a_cosine_schedule_says_what_it_does(tmp_path, capsys):
    run = tmp_path / "cos"
    assert cli("train", TINY, "--out", str(run), "--quiet", "--set", "train.schedule=cosine", "--set", "train.max_train_batches=2") == 0
    capsys.readouterr()
    assert cli("train", "--resume", str(run), "--quiet", "--set", "train.epochs=4") == 0
    err = capsys.readouterr().err
    assert "cosine schedule" in err and "stretched from 2 to 4 epochs" in err


def test_written_files_follow_the_umask_and_stale_temporaries_go(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        run = tmp_path / "modes"
        assert cli("train", TINY, "--out", str(run), "--quiet", "--set", "train.max_train_batches=2") == 0
        for path in (run / "config.yaml", run / "metrics.csv", run / "test.json", run / "checkpoints" / "last.pt"):
            assert path.stat().st_mode & 0o777 == 0o644, path
    finally:
        os.umask(old)
    stale = [run / "checkpoints" / ".last.pt.abc123.tmp", run / ".metrics.csv.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert cli("train", "--resume", str(run), "--quiet", "--set", "train.epochs=3") == 0
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"not,a,metrics\nfile,at,all\n"])
def test_resume_with_an_unreadable_metrics_file(tmp_path, capsys, content):
    run = tmp_path / "m"
    assert cli("train", TINY, "--out", str(run), "--quiet", "--set", "train.max_train_batches=2", "--set", "train.epochs=1") == 0
    (run / "metrics.csv").write_bytes(content)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    del state["metrics"]  # a checkpoint written before rows were kept in it
    torch.save(state, run / "checkpoints" / "last.pt")
    one_line_error(capsys, cli("train", "--resume", str(run), "--set", "train.epochs=2"), "metrics")


def test_resume_from_a_checkpoint_without_training_state(tmp_path, capsys):
    run = tmp_path / "w"
    assert cli("train", TINY, "--out", str(run), "--quiet", "--set", "train.max_train_batches=2", "--set", "train.epochs=1") == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    del state["optimizer"]
    torch.save(state, run / "checkpoints" / "last.pt")
    one_line_error(capsys, cli("train", "--resume", str(run), "--set", "train.epochs=2"), "optimizer")
