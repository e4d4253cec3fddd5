"""Bad input found by a probe of the CLI: each case gets one `error:` line, exit status 2, and damages nothing."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from helpers import one_line_error, run_cli as cli
from irrepscope.config import ModelConfig
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "quick" / "tiny.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    assert cli("train", TINY, "--out", str(out), "--quiet", "--set", "train.epochs=1", "--set", "train.max_train_batches=2") == 0
    return out


# -- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("train:\n  seed: -1\n", "train.seed"),
        ("train:\n  seed: 123456789012345678901234567890\n", "train.seed"),
        ("model:\n  num_elements: 5\n", "model.num_elements"),
        ("model:\n  hidden_mul: 100000000\n", "parameters"),
    ],
)
def test_bad_values_leave_nothing_behind(tmp_path, capsys, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    one_line_error(capsys, cli("train", str(path), "--out", str(tmp_path / "run")), match)
    assert not (tmp_path / "run").exists()


def test_seed_in_a_sweep_file(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(f"configs:\n  - config: {TINY}\nseeds: [-1]\n")
    one_line_error(capsys, cli("sweep", str(path), "--out", str(tmp_path / "out")), "train.seed")


def test_non_utf8_config(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  orders: [0, 1]  # r\xe9sum\xe9\n".encode("latin-1"))
    one_line_error(capsys, cli("info", str(path)), "UTF-8")


def test_set_on_a_config_whose_section_is_a_list(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("model: [1, 2]\n")
    one_line_error(capsys, cli("info", str(path), "--set", "train.epochs=2"), "not a mapping")


def test_an_alias_bomb_is_quoted_briefly(tmp_path, capsys):
    levels = ["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for k in range(1, 6):  # each level: ten copies of the one before (10^6 integers in all)
        levels.append(f"&{chr(97 + k)} [" + ", ".join([f"*{chr(96 + k)}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("model:\n  orders: [" + ", ".join(levels) + "]\n")
    err = one_line_error(capsys, cli("info", str(path)), "orders")
    assert len(err) < 400


def test_parameter_count_is_computed_exactly_without_building():
    for orders, mul in ([0, 1, 2], 32), ([0, 3, 4, 5, 6], 16), ([0, 2], 4):
        cfg = ModelConfig(orders=orders, hidden_mul=mul)
        assert cfg.parameter_count() == build_model(cfg).num_parameters()


# -- the CLI's own usage errors, numbers, the environment ------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (["train", TINY, "--bogus"], "No such option"),
        (["sweep", TINY, "--workers", "abc"], "abc"),
        (["analyze", "RUN", "--threshold", "nan"], "--threshold"),
        (["analyze", "RUN", "--threshold", "-1"], "--threshold"),
        (["analyze", "RUN", "--orders", ""], "--orders"),
        (["analyze", "RUN", "--max-molecules", "-3"], "--max-molecules"),
        (["prune", "RUN", "--threshold", "inf"], "--threshold"),
    ],
)
def test_usage_errors_are_one_line(run, capsys, args, match):
    args = [str(run) if a == "RUN" else a for a in args]
    one_line_error(capsys, cli(*args), match)


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    code = cli("train", TINY, "--out", str(target))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line_error(capsys, cli("train", TINY, "--out", str(ro / "run")), "cannot access")
    finally:
        ro.chmod(0o700)


def test_environment_errors_are_one_line(run, capsys, monkeypatch):
    """A full disk or a refused write (simulated where the test runs as root): one line, nothing damaged."""
    import irrepscope.atomic as atomic

    before = (run / "test.json").read_text()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(run / "test.json"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", full)
    one_line_error(capsys, cli("evaluate", str(run)), "No space left on device")
    assert (run / "test.json").read_text() == before


def test_set_backend_refuses_unknown_names():
    model = build_model(ModelConfig(orders=[0, 1], hidden_mul=2, num_blocks=1))
    with pytest.raises(IrrepscopeError, match="unknown backend"):
        model.set_backend("fats")
    assert model.backend == "fast"


# -- predict on strange molecules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions, match",
    [
        ([[0, 0, 0], [0, 0, 0], [0.9, 0, 0]], "apart"),
        ([[0, 0, 0], [np.nan, 0, 0], [0.9, 0, 0]], "non-finite"),
        ([[0, 0, 0], [np.inf, 0, 0], [0.9, 0, 0]], "non-finite"),
    ],
)
def test_predict_refuses_impossible_geometry(run, tmp_path, capsys, positions, match):
    path = tmp_path / "bad.xyz"
    path.write_text("3\n\n" + "".join(f"{s} {x} {y} {z}\n" for s, (x, y, z) in zip("OHH", positions)))
    one_line_error(capsys, cli("predict", str(run), str(path), "--json"), match)


def test_predict_warns_outside_qm9(run, tmp_path, capsys):
    path = tmp_path / "odd.xyz"
    chain = Atoms("C40", positions=[[1.5 * k, 0, 0] for k in range(40)])
    write(path, [Atoms("H", positions=[[0, 0, 0]]), chain])
    assert cli("predict", str(run), str(path), "--json") == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)  # strict JSON: no NaN
    assert len(results) == 2 and all(np.isfinite(r["prediction"]) for r in results)
    assert "warning: molecule 0: outside QM9: 1 atoms" in captured.err
    assert "warning: molecule 1" in captured.err and "40 heavy atoms" in captured.err
