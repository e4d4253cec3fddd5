"""irrepscope under every e3nn it supports: 0.6 (the main environment) and 0.4.4 (MACE's; scripts/test.sh runs
this file in both). What the version could change: imports, noise on stderr, checkpoint loading, the numbers.

The numbers of our models themselves are checked across versions by the rest of the e3nn-sensitive tests run in
both environments, above all ``test_interface``'s analysis of a checkpoint written in 2026-11 under e3nn 0.6 against
its stored record: the same to float tolerance under 0.4.4 too.
"""

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import irrepscope  # noqa: F401  (the import under test)
from irrepscope.compat import E3NN_LEGACY, E3NN_VERSION
from irrepscope.errors import IrrepscopeError
from irrepscope.training.runs import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_one_we_support():
    assert (0, 4, 4) <= E3NN_VERSION < (0, 7)
    assert E3NN_LEGACY == (E3NN_VERSION < (0, 5))


def test_importing_leaves_torchs_safe_globals_alone():
    """e3nn 0.4's constants need ``slice`` allowed once, at import: in a context, not added for good."""
    from e3nn import o3

    assert slice not in torch.serialization.get_safe_globals()
    assert o3.wigner_3j(1, 1, 2).shape == (3, 3, 5)


def test_building_and_running_models_prints_nothing_on_stderr(tmp_path):
    """A fresh process that builds a model, trains it briefly and analyses it: nothing from e3nn on stderr."""
    code = f"""
import sys
from irrepscope.cli import main
for args in (["info", "{ROOT}/configs/quick/tiny.yaml"],
             ["train", "{ROOT}/configs/quick/tiny.yaml", "--out", "{tmp_path}/run", "--set", "train.epochs=1", "--quiet"],
             ["analyze", "{tmp_path}/run", "--max-molecules", "40", "--embedding", "pca", "--quiet"]):
    try:
        main(args)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]


class _Payload:
    """What a malicious checkpoint could carry: any class, instantiated at unpickling."""

    def __reduce__(self):
        return (print, ("this should never run",))


def test_our_checkpoints_load_weights_only_whatever_the_environment_says(tmp_path, monkeypatch):
    """``import mace`` sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 process-wide: our loads stay weights-only."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"config": {}, "model": {"w": torch.ones(2)}})
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"format": 1, "config": {}, "model": {}, "payload": _Payload()}, bad)
    with zipfile.ZipFile(bad) as archive:  # the file does hold the pickled global
        assert any(name.endswith("data.pkl") for name in archive.namelist())
    with pytest.raises(IrrepscopeError, match="corrupt checkpoint"):
        load_checkpoint(bad)
    assert pickle.dumps(_Payload())  # (the payload is a real pickle, refused only by the weights-only loader)


def test_a_mace_model_without_mace_names_the_extra(tmp_path, capsys):
    import importlib.util

    from helpers import one_line_error, run_cli

    if importlib.util.find_spec("mace") is not None:
        pytest.skip("mace-torch is installed in this environment")
    model = tmp_path / "my.model"
    model.write_bytes(b"not read: the package is missing")
    code = run_cli("analyze", str(model), "--molecules", str(tmp_path / "test.extxyz"),
                   "--train-molecules", str(tmp_path / "train.extxyz"), "--out", str(tmp_path / "out"))  # fmt: skip
    one_line_error(capsys, code, "pip install 'irrepscope[mace]'")
