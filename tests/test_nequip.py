"""A trained NequIP model analysed through the same interface: tiny models are trained here (about a minute).

One energy-only model on QM9 (``configs/nequip/qm9_energy.yaml``), and force fields on 30
rattled QM9 molecules labelled with GFN2-xTB (``configs/nequip/xtb_forces.yaml``, float32
as configured and float64 for exact finite differences).
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nequip")

from helpers import run_cli  # noqa: E402
from irrepscope.analysis.features import collect  # noqa: E402
from irrepscope.analysis.nequip_model import NODE_FEATURES, NequIPModel, load_nequip, preserved_global_state  # noqa: E402
from irrepscope.analysis.runner import analyze_model  # noqa: E402
from irrepscope.data.split import load_split  # noqa: E402
from irrepscope.data.xyz import read_extxyz  # noqa: E402
from irrepscope.errors import IrrepscopeError  # noqa: E402
from irrepscope.orders import order_slices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["num_layers=2", "num_features=4", "training_module.model.radial_mlp_width=8", "max_epochs=2"]


def nequip_train(config: str, data: Path, run: Path, *overrides: str) -> Path:
    """``nequip-train`` with ``configs/nequip/{config}.yaml`` on ``data``'s extxyz files, on the CPU; its best.ckpt."""
    train = shutil.which("nequip-train") or str(Path(sys.executable).parent / "nequip-train")
    cmd = [train, "-cp", str(ROOT / "configs" / "nequip"), "-cn", config, f"data_dir={data}", f"hydra.run.dir={run}",
           "trainer.accelerator=cpu", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "best.ckpt"


@pytest.fixture(scope="module")
def irrepscope_run(tmp_path_factory):
    """A (barely trained) irrepscope run: its saved split and target are what NequIP trains and is analysed on."""
    run = tmp_path_factory.mktemp("ours") / "run"
    args = ["train", str(ROOT / "configs" / "quick" / "tiny.yaml"), "--out", str(run), "--quiet",
            "--set", "data.limit=300", "--set", "train.epochs=1", "--set", "train.max_train_batches=1"]  # fmt: skip
    assert run_cli(*args) == 0
    return run


@pytest.fixture(scope="module")
def split(irrepscope_run):
    return load_split(irrepscope_run / "split.json")


@pytest.fixture(scope="module")
def checkpoint(irrepscope_run, tmp_path_factory):
    """`irrepscope export` of the run's split, then nequip-train: 3 epochs, l_max 2, 3 layers of 8 features."""
    tmp = tmp_path_factory.mktemp("nequip")
    assert run_cli("export", str(irrepscope_run), "--out", str(tmp / "data")) == 0
    return nequip_train("qm9_energy", tmp / "data", tmp / "run", "max_epochs=3", "num_layers=3", "num_features=8")


def test_export_writes_the_runs_split(irrepscope_run, split, checkpoint, qm9):
    import ase.io

    data = checkpoint.parent.parent / "data"
    for name in ("train", "val", "test"):
        frames = ase.io.read(data / f"{name}.extxyz", index=":")
        assert [f.info["index"] for f in frames] == split[name].tolist()
        assert [f.info["qm9_index"] for f in frames] == qm9.properties["qm9_index"][split[name]].tolist()
        assert frames[0].get_potential_energy() == pytest.approx(qm9.properties["U0_atomization"][split[name][0]])


def test_cli_analyses_a_nequip_model_on_a_runs_split(checkpoint, irrepscope_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = run_cli("analyze", str(checkpoint), "--molecules", str(irrepscope_run), "--out", str(out), "--quiet",
                   "--embedding", "pca", "--map-molecules", "30", "--probe-molecules", "100", "--ablation-molecules", "30")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    usage = __import__("json").loads((out / "usage.json").read_text())
    assert usage["family"] == "nequip" and usage["n_molecules"] == 30 and usage["molecules"] == str(irrepscope_run)
    assert (out / "report.html").is_file() and (out / "usage.csv").is_file()
    assert "composition baseline" in capsys.readouterr().out


def test_cli_nequip_errors(checkpoint, tmp_path, capsys):
    assert run_cli("analyze", str(checkpoint)) == 2
    assert "--molecules" in capsys.readouterr().err
    compiled = tmp_path / "m.nequip.pt2"
    compiled.write_bytes(b"x")
    assert run_cli("analyze", str(compiled), "--molecules", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and ".ckpt" in err and "\n" not in err


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


def test_a_packaged_model_gives_the_checkpoints_energies(checkpoint, qm9, split):
    package = checkpoint.parent / "model.nequip.zip"
    tool = shutil.which("nequip-package") or str(Path(sys.executable).parent / "nequip-package")
    proc = subprocess.run([tool, "build", str(checkpoint), str(package)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt, zipped = NequIPModel.load(checkpoint), NequIPModel.load(package)
    assert [str(i) for i in zipped.block_irreps] == [str(i) for i in ckpt.block_irreps]
    batch = next(ckpt.batches(qm9, split["test"][:10], 10))
    with torch.no_grad():
        torch.testing.assert_close(zipped.forward(batch), ckpt.forward(batch))
        torch.testing.assert_close(zipped.ablation(batch, 0, 2), ckpt.ablation(batch, 0, 2))


def test_analysis_on_exported_files_equals_analysis_on_the_runs_split(checkpoint, irrepscope_run, tmp_path):
    """--molecules test.extxyz --train-molecules train.extxyz: the same molecules give the same numbers as the run."""
    from irrepscope.api import analyze_nequip

    data = checkpoint.parent.parent / "data"
    opts = dict(embedding="pca", map_molecules=30, probe_molecules=100, ablation_molecules=30, max_molecules=30, progress=False)
    on_run = analyze_nequip(checkpoint, irrepscope_run, out=tmp_path / "run", **opts)
    on_files = analyze_nequip(checkpoint, data / "test.extxyz", out=tmp_path / "files", train_molecules=data / "train.extxyz", **opts)
    assert on_files["target"] == "energy" and on_files["unit"] == "eV" and on_files["split"] == "test.extxyz"
    for key in ("model_mae", "baseline_mae", "n_molecules"):
        assert on_files[key] == pytest.approx(on_run[key], rel=1e-6)
    assert len(on_files["rows"]) == len(on_run["rows"])
    for a, b in zip(on_files["rows"], on_run["rows"]):
        assert (a["block"], a["order"], a["verdict"]) == (b["block"], b["order"], b["verdict"])
        for key in ("ablation_delta_mae_ev", "norm_share_node", "probe_r2"):
            if a.get(key) is not None and b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a, key)


def test_structure_file_errors(checkpoint, irrepscope_run, tmp_path, capsys):
    data = checkpoint.parent.parent / "data"
    assert run_cli("analyze", str(checkpoint), "--molecules", str(data / "test.extxyz")) == 2
    assert "--train-molecules" in capsys.readouterr().err
    unlabelled = tmp_path / "nolabel.xyz"
    unlabelled.write_text("2\n\nH 0 0 0\nH 0 0 0.74\n")
    assert run_cli("analyze", str(checkpoint), "--molecules", str(unlabelled), "--train-molecules", str(data / "train.extxyz")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "'energy'" in err and "\n" not in err
    assert run_cli("analyze", str(irrepscope_run), "--train-molecules", str(data / "train.extxyz")) == 2
    assert "--train-molecules" in capsys.readouterr().err


# --- force fields: NequIP trained on energies and forces -------------------------------------------------------------


@pytest.fixture(scope="module")
def xtb_data(qm9, tmp_path_factory):
    """30 QM9 molecules rattled by N(0, 0.05 Å), GFN2-xTB energies (eV) and forces (eV/Å): train/val/test.extxyz (20/5/5)."""
    pytest.importorskip("tblite")
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from tblite.ase import TBLite

    rng = np.random.default_rng(0)
    frames = []
    for k, i in enumerate(rng.choice(len(qm9), 30, replace=False)):
        z, pos = qm9.structure(int(i))
        atoms = Atoms(numbers=z, positions=pos + rng.normal(0.0, 0.05, pos.shape))
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        atoms.info.update(qm9_index=int(qm9.properties["qm9_index"][i]), index=k)  # as `irrepscope export` writes them
        frames.append(atoms)
    data = tmp_path_factory.mktemp("xtb") / "data"
    data.mkdir()
    for name, part in (("train", frames[:20]), ("val", frames[20:25]), ("test", frames[25:])):
        ase.io.write(data / f"{name}.extxyz", part, format="extxyz")
    return data


@pytest.fixture(scope="module")
def force_checkpoint(xtb_data):
    """configs/nequip/xtb_forces.yaml as it is (float32), shrunk: 2 epochs, 2 layers of 4 features."""
    return nequip_train("xtb_forces", xtb_data, xtb_data.parent / "run32", *TINY)


@pytest.fixture(scope="module")
def force_checkpoint64(xtb_data):
    """The same in float64: forces are checked against finite differences to float64 accuracy."""
    return nequip_train("xtb_forces", xtb_data, xtb_data.parent / "run64", *TINY, "model_dtype=float64")


@pytest.fixture(scope="module")
def xtb_test(xtb_data):
    """The 5 test molecules as Structures, with their xTB forces."""
    structures, _ = read_extxyz([xtb_data / "test.extxyz"], forces_key="forces")
    return structures


def zero_l1_after_layer0(model):
    """A hand-written hook: order 1 of layer 0's output zeroed."""
    columns = order_slices(model.block_irreps[0])[1]

    def hook(i, x):
        if i != 0:
            return x
        y = x.clone()
        y[:, columns] = 0
        return y

    return hook


def nequip_calculator_forces(checkpoint, structures):
    """Energies and forces from NequIP's own ASE calculator on its own loading of the checkpoint (derivatives as saved).

    Run in NequIP's process state (float64 default dtype: ``from_ase`` casts positions to it), then restored.
    """
    from ase import Atoms
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.integrations.ase import NequIPCalculator
    from nequip.model.saved_models.load_utils import load_saved_model
    from nequip.utils.global_state import set_global_state

    energies, forces = [], []
    with preserved_global_state():
        set_global_state()
        torch.set_default_dtype(torch.float64)  # set_global_state() sets it only on its first call in a process
        model = load_saved_model(str(checkpoint)).eval()
        transforms = [ChemicalSpeciesToAtomTypeMapper(model_type_names=model.metadata["type_names"].split(" ")),
                      NeighborListTransform(r_max=float(model.metadata["r_max"]))]  # fmt: skip
        calc = NequIPCalculator(model, device="cpu", transforms=transforms)
        for i in range(len(structures)):
            z, pos = structures.structure(i)
            atoms = Atoms(numbers=z, positions=pos)
            atoms.calc = calc
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
    return np.array(energies), np.concatenate(forces)


def test_a_force_field_gives_nequips_own_forces(force_checkpoint, xtb_test):
    model = NequIPModel.load(force_checkpoint)
    assert model.supports_forces and model.dtype == torch.float32
    batch = next(model.batches(xtb_test, np.arange(len(xtb_test)), 8))
    pos = batch.inputs["pos"]
    with torch.no_grad():
        energies, forces = model.energy_and_forces(batch)
        assert torch.equal(model.forward(batch), model.forward(batch))  # energies only again, under no_grad
    assert forces.shape == (len(xtb_test.atomic_numbers), 3) and energies.shape == (len(xtb_test),)
    assert forces.dtype == energies.dtype == torch.float64  # a float32 model: float64 positions, energies, forces
    assert not forces.requires_grad and not energies.requires_grad
    assert batch.inputs["pos"] is pos and not pos.requires_grad  # NequIP marked a copy, not the batch's positions
    expected_energies, expected_forces = nequip_calculator_forces(force_checkpoint, xtb_test)
    np.testing.assert_allclose(forces.numpy(), expected_forces, rtol=1e-6, atol=1e-6)  # atoms in batch order
    np.testing.assert_allclose(energies.numpy(), expected_energies, rtol=1e-9, atol=1e-5)  # float32 summation order
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(batch).numpy(), energies.numpy(), rtol=1e-12, atol=1e-9)
    assert np.abs(forces.numpy()).max() > 1e-3  # not vacuous


@pytest.mark.parametrize("ablated", [False, True], ids=["model", "l1_zeroed_after_layer0"])
def test_forces_are_minus_the_gradient_of_the_energies(force_checkpoint64, xtb_test, ablated):
    """Central differences of forward's energies (float64 model, the batch's graph kept), through the same hook."""
    model = NequIPModel.load(force_checkpoint64)
    assert model.dtype == torch.float64
    hook = zero_l1_after_layer0(model) if ablated else None
    batch = next(model.batches(xtb_test, np.arange(len(xtb_test)), 8))
    with torch.no_grad():
        _, forces = model.energy_and_forces(batch, hook)
    rng = np.random.default_rng(1)
    h = 1e-4
    for atom, xyz in zip(rng.choice(len(forces), 12, replace=False), rng.integers(0, 3, 12)):
        energies = []
        for sign in (1, -1):
            pos = batch.inputs["pos"].clone()
            pos[atom, xyz] += sign * h
            with torch.no_grad():
                energies.append(model.forward(dataclasses.replace(batch, inputs={**batch.inputs, "pos": pos}), hook))
        molecule = int(batch.atom_graph[atom])
        fd = -(energies[0][molecule] - energies[1][molecule]).item() / (2 * h)
        assert fd == pytest.approx(forces[atom, xyz].item(), rel=1e-5, abs=1e-6), (atom, xyz)  # ablation: ~1e-3


def test_forces_of_an_ablated_force_field(force_checkpoint, xtb_test):
    model = NequIPModel.load(force_checkpoint)
    batch = next(model.batches(xtb_test, np.arange(len(xtb_test)), 8))
    with torch.no_grad():
        _, forces = model.energy_and_forces(batch)
        energies, ablated = model.energy_and_forces(batch, zero_l1_after_layer0(model))
    torch.testing.assert_close(energies, model.ablation(batch, 0, 1))
    assert (ablated - forces).abs().max() > 1e-5  # the forces went through the zeroed features
    via_interface = model.force_ablation(batch, 0, 1)
    torch.testing.assert_close(via_interface[0], energies)
    torch.testing.assert_close(via_interface[1], ablated)


def test_forces_rotate_with_the_molecules(force_checkpoint, xtb_test):
    from scipy.spatial.transform import Rotation

    model = NequIPModel.load(force_checkpoint)
    rot = Rotation.random(random_state=5).as_matrix()
    rotated = dataclasses.replace(xtb_test, positions=xtb_test.positions @ rot.T)
    idx = np.arange(len(xtb_test))
    e, f = model.energy_and_forces(next(model.batches(xtb_test, idx, 8)))
    e_rot, f_rot = model.energy_and_forces(next(model.batches(rotated, idx, 8)))
    np.testing.assert_allclose(e_rot.numpy(), e.numpy(), rtol=1e-6, atol=1e-4)  # float32 inside
    np.testing.assert_allclose(f_rot.numpy(), f.numpy() @ rot.T, rtol=1e-4, atol=1e-5 * np.abs(f.numpy()).max())


def test_forces_leave_the_model_and_the_batch_as_they_were(force_checkpoint, xtb_test):
    from irrepscope.analysis.nequip_model import derivative_modules

    model = NequIPModel.load(force_checkpoint)
    batch = next(model.batches(xtb_test, np.arange(len(xtb_test)), 8))
    keys = set(batch.inputs)

    def failing(i, x):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.energy_and_forces(batch, failing)
    assert all(not m.do_derivatives for m in derivative_modules(model.model))  # energies only again
    assert all(not layer._forward_hooks for _, layer in model.layers)  # no hook left behind
    assert set(batch.inputs) == keys and not batch.inputs["pos"].requires_grad
    with torch.no_grad():
        assert model.forward(batch).shape == (len(xtb_test),)


def test_an_energy_only_model_reports_no_forces(checkpoint, qm9, split):
    """NequIP's energy-only models (do_derivatives false) have no forces here, though their energy is differentiable:
    its gradient was never trained to be a force, and NequIP's own calculator gives none either."""
    model = NequIPModel.load(checkpoint)
    assert not model.supports_forces
    batch = next(model.batches(qm9, split["test"][:4], 4))
    for call in (lambda: model.energy_and_forces(batch), lambda: model.force_ablation(batch, 0, 1)):
        with pytest.raises(IrrepscopeError, match="energies only") as err:
            call()
        assert "\n" not in str(err.value)
