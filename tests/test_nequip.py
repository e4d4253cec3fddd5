"""A trained NequIP model analysed through the same interface: a tiny model is trained here (under a minute)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nequip")

from irrepscope.analysis.features import collect  # noqa: E402
from irrepscope.analysis.nequip_model import NODE_FEATURES, NequIPModel, load_nequip  # noqa: E402
from irrepscope.analysis.runner import analyze_model  # noqa: E402
from irrepscope.data.export import export_split  # noqa: E402
from irrepscope.data.split import random_split  # noqa: E402
from irrepscope.errors import IrrepscopeError  # noqa: E402
from irrepscope.orders import order_slices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split(qm9):
    return random_split(len(qm9), (0.8, 0.1, 0.1), seed=0, limit=300)


@pytest.fixture(scope="module")
def checkpoint(qm9, split, tmp_path_factory):
    """nequip-train on 240 exported QM9 molecules, 3 epochs, l_max 2, 3 layers of 8 features."""
    tmp = tmp_path_factory.mktemp("nequip")
    export_split(qm9, split, tmp / "data", "U0_atomization")
    train = shutil.which("nequip-train") or str(Path(sys.executable).parent / "nequip-train")
    cmd = [
        train, "-cp", str(ROOT / "configs" / "nequip"), "-cn", "qm9_energy", f"data_dir={tmp / 'data'}",
        f"hydra.run.dir={tmp / 'run'}", "max_epochs=3", "num_layers=3", "num_features=8", "trainer.accelerator=cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run" / "best.ckpt"


def test_loading_leaves_the_callers_state_alone(checkpoint):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    model = load_nequip(checkpoint)
    assert torch.get_default_dtype() == torch.float32
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training  # loaded models come back in train mode: we switch them to eval


def test_analysis_end_to_end(checkpoint, qm9, split):
    model = NequIPModel.load(checkpoint)
    irreps = model.block_irreps
    assert len(irreps) == 3 and {ir.l for _, ir in irreps[0]} == {0, 1, 2}
    assert {ir.l for _, ir in irreps[-1]} == {0}  # NequIP's last layer: scalars only
    res = analyze_model(model, qm9, split["test"], split["train"], target="U0_atomization", embedding="pca",
                        map_molecules=30, probe_molecules=100, ablation_molecules=30, batch_size=16, progress=False)  # fmt: skip
    assert res["family"] == "nequip" and res["num_blocks"] == 3 and res["orders"] == [0, 1, 2]
    rows = {(r["block"], r["order"]): r for r in res["rows"]}
    assert rows[(3, 1)]["verdict"] == "absent" and rows[(3, 0)]["verdict"] in ("used", "unused")
    assert np.isfinite(res["model_mae"]) and res["baseline_mae"] > 0
    # zeroing order 0 after every layer changes the energies (the check is not vacuous)
    assert rows[("all", 0)]["ablation_delta_mae_ev"] != 0


def test_zeroing_through_the_interface_equals_a_hand_written_hook(checkpoint, qm9, split):
    model = NequIPModel.load(checkpoint)
    batch = next(model.batches(qm9, split["test"][:12], 12))
    via_interface = model.ablation(batch, 0, 1)
    name, layer = model.layers[0]
    columns = order_slices(model.block_irreps[0])[1]

    def by_hand(module, inputs, out):
        new = dict(out)
        new[NODE_FEATURES] = out[NODE_FEATURES].clone()
        new[NODE_FEATURES][:, columns] = 0
        return new

    handle = layer.register_forward_hook(by_hand)
    try:
        with torch.no_grad():
            expected = model.model(dict(batch.inputs))["total_energy"].reshape(-1)
    finally:
        handle.remove()
    torch.testing.assert_close(via_interface, expected)
    with torch.no_grad():
        assert (via_interface - model.forward(batch)).abs().max() > 1e-6


def test_usage_numbers_are_rotation_invariant(checkpoint, qm9, split):
    import dataclasses

    from scipy.spatial.transform import Rotation

    model = NequIPModel.load(checkpoint)
    idx = split["test"][:16]
    rot = Rotation.random(random_state=3).as_matrix()
    rotated = dataclasses.replace(qm9, positions=qm9.positions @ rot.T)
    a = collect(model, qm9, idx, target="U0_atomization", batch_size=8)
    b = collect(model, rotated, idx, target="U0_atomization", batch_size=8)
    np.testing.assert_allclose(b.prediction, a.prediction, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b.ablation_prediction, a.ablation_prediction, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b.grad_x_input, a.grad_x_input, rtol=1e-3, atol=1e-6)
    for blk_a, blk_b in zip(a.graph_invariants, b.graph_invariants):
        for l in blk_a:
            np.testing.assert_allclose(blk_b[l], blk_a[l], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["model.nequip.pth", "model.nequip.pt2", "model.pt"])
def test_compiled_or_unknown_formats_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not hookable")
    with pytest.raises(IrrepscopeError, match=r"\.ckpt"):
        load_nequip(path)
