"""Vector and tensor targets (charge dipole 1o, charge quadrupole 2e): the targets, the model's equivariance, the analysis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3

from helpers import run_cli
from irrepscope.analysis import usage
from irrepscope.analysis.features import collect
from irrepscope.analysis.own_model import OwnModel
from irrepscope.config import ModelConfig, load_config
from irrepscope.data import collate
from irrepscope.data.multipoles import _symmetric_to_2e, centred_positions, charge_multipoles
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import build_model

ROOT = Path(__file__).resolve().parents[1]
IDX = np.arange(300, 330)
TARGETS = {"charge_dipole": "1o", "charge_quadrupole": "2e"}


def transformed(mols, indices, matrix, shift=np.zeros(3)):
    """``mols`` with molecules ``indices`` moved by ``pos @ matrix.T + shift`` (targets recomputed from the geometry)."""
    pos = mols.positions.copy()
    for i in indices:
        a, b = mols.atom_ptr[i], mols.atom_ptr[i + 1]
        pos[a:b] = pos[a:b] @ matrix.T + shift
    moved = dataclasses.replace(mols, positions=pos, properties=dict(mols.properties))
    moved.properties.update(charge_multipoles(moved))
    return moved


def orthogonal(seed: int, proper: bool) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    r = Rotation.random(random_state=seed).as_matrix()  # orthogonal to float64 precision
    return r if proper else -r  # -R: a rotation times the inversion (a reflection)


def test_basis_is_e3nns_cartesian_tensor():
    from e3nn.io import CartesianTensor

    eye = torch.eye(9, dtype=torch.float64).reshape(9, 3, 3)
    expected = CartesianTensor("ij=ji").from_cartesian(eye).numpy()[:, 1:]
    np.testing.assert_allclose(_symmetric_to_2e(), expected, atol=1e-6)  # e3nn builds its basis in float32


def test_targets_by_hand(qm9):
    from ase.data import atomic_masses

    i = 1234
    a, b = qm9.atom_ptr[i], qm9.atom_ptr[i + 1]
    z, r, q = qm9.atomic_numbers[a:b], qm9.positions[a:b], qm9.atom_properties["mulliken"][a:b]
    x = r - (atomic_masses[z][:, None] * r).sum(0) / atomic_masses[z].sum()
    np.testing.assert_allclose(centred_positions(qm9)[a:b], x, atol=1e-12)
    np.testing.assert_allclose(qm9.properties["charge_dipole"][i], (q[:, None] * x).sum(0), atol=1e-12)
    quad = sum(qk * (3 * np.outer(xk, xk) - xk @ xk * np.eye(3)) for qk, xk in zip(q, x))
    assert abs(np.trace(quad)) < 1e-10
    comps = qm9.properties["charge_quadrupole"][i]
    np.testing.assert_allclose(comps, quad.reshape(9) @ _symmetric_to_2e(), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(comps), np.linalg.norm(quad), rtol=1e-12)  # orthonormal basis


@pytest.mark.parametrize("proper", [True, False])
def test_targets_of_moved_molecules_are_the_moved_targets(qm9, proper):
    matrix = orthogonal(1, proper)
    moved = transformed(qm9, IDX, matrix, shift=np.array([3.0, -1.0, 7.5]))
    for name, irreps in TARGETS.items():
        np.testing.assert_allclose(moved.properties[name][IDX], act(irreps, matrix, qm9.properties[name][IDX]), atol=1e-9)
        assert np.abs(qm9.properties[name][IDX]).max() > 0.1  # not vacuous
    # The inversion flips a dipole (1o) and leaves a quadrupole (2e) alone.
    inverted = transformed(qm9, IDX, -np.eye(3))
    np.testing.assert_allclose(inverted.properties["charge_dipole"][IDX], -qm9.properties["charge_dipole"][IDX], atol=1e-12)
    np.testing.assert_allclose(inverted.properties["charge_quadrupole"][IDX], qm9.properties["charge_quadrupole"][IDX], atol=1e-12)


def act(irreps: str, matrix: np.ndarray, y: np.ndarray) -> np.ndarray:
    """An orthogonal ``matrix`` acting on rows of 1o or 2e components, through Cartesian tensors in float64.

    (e3nn's D_from_matrix goes through Euler angles and float32 constants: good to 1e-7 only.)
    """
    if irreps == "1o":
        return y @ matrix.T
    basis = _symmetric_to_2e()  # orthonormal columns: the Cartesian tensor is basis @ c
    tensors = (y @ basis.T).reshape(-1, 3, 3)
    return (matrix @ tensors @ matrix.T).reshape(-1, 9) @ basis


def test_our_action_is_e3nns_wigner_d():
    y = np.random.default_rng(0).normal(size=(4, 5))
    for proper in (True, False):
        matrix = orthogonal(3, proper)
        for irreps, comps in (("1o", y[:, :3]), ("2e", y)):
            d = o3.Irreps(irreps).D_from_matrix(torch.from_numpy(matrix)).numpy()
            np.testing.assert_allclose(act(irreps, matrix, comps), comps @ d.T, atol=1e-6)


def tiny_model(target, backend, orders=(0, 1, 2), seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(orders=list(orders), hidden_mul=3, num_blocks=3, backend=backend), target)
    model.set_target_stats(0.0, 0.7)
    return model.double().eval()


@pytest.mark.parametrize("backend", ["e3nn", "fast"])
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("proper", [True, False])
def test_outputs_transform_with_their_irreps(qm9, backend, target, proper):
    """Rotations and reflections act by the Wigner D matrix; translations and atom permutations do nothing."""
    model = tiny_model(target, backend)
    matrix = orthogonal(2, proper)
    batch = collate(qm9, IDX, None, dtype=torch.float64)
    moved = collate(transformed(qm9, IDX, matrix, shift=np.array([-2.0, 5.0, 1.0])), IDX, None, dtype=torch.float64)
    with torch.no_grad():
        out, out_moved = model(batch).prediction, model(moved).prediction
    assert out.shape == (len(IDX), o3.Irreps(TARGETS[target]).dim)
    np.testing.assert_allclose(out_moved.numpy(), act(TARGETS[target], matrix, out.numpy()), rtol=1e-9, atol=1e-9)
    assert out.abs().max() > 1e-3
    # Permuting the atoms (and the edges with them) of the batch changes nothing.
    perm = torch.randperm(batch.z.numel(), generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    permuted = dataclasses.replace(batch, z=batch.z[perm], pos=batch.pos[perm], batch=batch.batch[perm],
                                   edge_src=inv[batch.edge_src], edge_dst=inv[batch.edge_dst])  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(permuted).prediction, out, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("target", list(TARGETS))
def test_gradient_shortcut_equals_rerun_for_vector_outputs(qm9, target):
    model = tiny_model(target, "fast", orders=(0, 1, 2, 3))
    own = OwnModel(model)
    ev = collect(own, qm9, IDX, target=target, batch_size=8)
    batch = own.wrap(collate(qm9, IDX, None, dtype=torch.float64))
    for b in range(3):
        for j, l in enumerate(model.orders):
            np.testing.assert_allclose(ev.ablation_prediction[b, j], own.ablation(batch, b, l).numpy(), rtol=1e-9, atol=1e-9)
    # At the last block only the target's own order reaches the readout: zeroing it gives the zero vector.
    l_out = o3.Irreps(TARGETS[target])[0].ir.l
    for j, l in enumerate(model.orders):
        want = np.zeros_like(ev.prediction) if l == l_out else ev.prediction
        np.testing.assert_allclose(ev.ablation_prediction[-1, j], want, atol=1e-10)
    restricted = own.all_blocks_ablation(batch, model.orders)
    for l in model.orders:
        np.testing.assert_allclose(restricted[l].numpy(), own.ablation(batch, None, l).numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.target=charge_dipole", "data.reference=per_element"], "per_element makes no sense"),
        (["data.target=charge_dipole", "model.orders=[0,2]"], "lacks 1"),
        (["data.target=charge_quadrupole", "model.orders=[0,1,3]"], "lacks 2"),
        (["data.target=charge_octupole"], "unknown"),
    ],
)
def test_bad_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(IrrepscopeError, match=message) as info:
        load_config(ROOT / "configs" / "quick" / "tiny.yaml", overrides)
    assert "\n" not in str(info.value)


def test_dipole_run_end_to_end(tmp_path, qm9, capsys):
    """Train, evaluate against the zero baseline, analyse: l = 1 at the last block carries the whole prediction."""
    run = tmp_path / "dipole"
    args = ["train", str(ROOT / "configs" / "quick" / "tiny.yaml"), "--out", str(run), "--quiet",
            "--set", "data.target=charge_dipole", "--set", "train.max_train_batches=4"]  # fmt: skip
    assert run_cli(*args) == 0
    assert "length of the error vector" in capsys.readouterr().out
    test = json.loads((run / "test.json").read_text())
    split = json.loads((run / "split.json").read_text())
    y = qm9.properties["charge_dipole"][np.asarray(split["test"])]
    assert test["unit"] == "e*Å" and test["reference"] == "none"
    assert test["baseline_mae_ev"] == pytest.approx(np.linalg.norm(y, axis=1).mean(), rel=1e-9)  # the zero vector
    assert test["component_mae"] < test["mae_ev"]
    assert run_cli("analyze", str(run), "--embedding", "pca", "--quiet", "--probe-molecules", "60") == 0
    result = json.loads((run / "analysis" / "usage.json").read_text())
    rows = {(r["block"], r["order"]): r for r in result["rows"]}
    last = max(b for b, _ in rows if b != "all")
    # Zeroing l = 1 after the last block leaves the zero vector: its MAE is the baseline's.
    assert rows[(last, 1)]["ablation_delta_mae_ev"] == pytest.approx(result["baseline_mae"] - result["model_mae"], rel=1e-6)
    assert rows[(last, 1)]["verdict"] == "used"
    assert rows[(last, 0)]["ablation_delta_mae_ev"] == pytest.approx(0.0, abs=1e-9)
    assert rows[(last, 2)]["ablation_delta_mae_ev"] == pytest.approx(0.0, abs=1e-9)
    assert usage.invariant(np.ones((2, 3))).tolist() == pytest.approx([3**0.5, 3**0.5])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny dipole model with a quadrupole head: the multi-task run and the source of fine-tuning."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    args = ["train", str(ROOT / "configs" / "quick" / "tiny.yaml"), "--out", str(run), "--quiet",
            "--set", "data.target=charge_dipole", "--set", "data.auxiliary=[charge_quadrupole]",
            "--set", "train.max_train_batches=4"]  # fmt: skip
    assert run_cli(*args) == 0
    return run


def test_auxiliary_heads_are_trained_evaluated_and_equivariant(pretrained, qm9):
    test = json.loads((pretrained / "test.json").read_text())
    aux = test["auxiliary"]["charge_quadrupole"]
    assert aux["unit"] == "e*Å^2" and aux["mae_ev"] > 0 and aux["baseline_mae_ev"] > 0
    from irrepscope.training.evaluate import model_from_checkpoint

    model, _, _ = model_from_checkpoint(pretrained / "checkpoints" / "best.pt")
    model = model.double()
    assert list(model.auxiliary_heads) == ["charge_quadrupole"] and float(model.auxiliary_std[0]) > 0.1
    matrix = orthogonal(5, False)
    with torch.no_grad():
        out = model.auxiliary_predictions(model(collate(qm9, IDX, None, dtype=torch.float64)))["charge_quadrupole"]
        moved = collate(transformed(qm9, IDX, matrix), IDX, None, dtype=torch.float64)
        out_moved = model.auxiliary_predictions(model(moved))["charge_quadrupole"]
    np.testing.assert_allclose(out_moved.numpy(), act("2e", matrix, out.numpy()), rtol=1e-8, atol=1e-8)


def test_fine_tuning_starts_from_the_trunk_and_keeps_its_own_statistics(pretrained, qm9):
    from irrepscope.data.split import load_split
    from irrepscope.training.evaluate import model_from_checkpoint
    from irrepscope.training.trainer import init_trunk

    config = load_config(ROOT / "configs" / "quick" / "tiny.yaml", [f"train.init_from={pretrained}"])
    torch.manual_seed(1)
    model = build_model(config.model, config.data.target)
    model.set_element_reference(torch.arange(100, dtype=torch.float32))
    readout = model.readout.weight.detach().clone()
    init_trunk(model, config, load_split(pretrained / "split.json"))
    source, _, _ = model_from_checkpoint(pretrained / "checkpoints" / "best.pt")
    for name, value in source.state_dict().items():
        if name.startswith(("embedding.", "blocks.")):
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert torch.equal(model.element_reference, torch.arange(100, dtype=torch.float32))  # not reset by a load hook
    assert torch.equal(model.readout.weight, readout)  # the head stays fresh


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hidden_mul=5"], "model.hidden_mul"),
        (["data.limit=null"], "test molecules"),  # all of QM9: its test split holds molecules pretrain trained on
    ],
)
def test_fine_tuning_refuses_a_different_trunk_or_a_leaking_split(pretrained, tmp_path, capsys, overrides, message):
    args = ["train", str(ROOT / "configs" / "quick" / "tiny.yaml"), "--out", str(tmp_path / "ft"), "--quiet",
            "--set", f"train.init_from={pretrained}", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert run_cli("train", str(ROOT / "configs" / "quick" / "tiny.yaml"), "--out", str(tmp_path / "ft2"), "--quiet",
                   "--set", f"train.init_from={tmp_path / 'nothing'}") == 2  # fmt: skip
    assert "best.pt" in capsys.readouterr().err


def test_report_names_the_zero_baseline(tmp_path):
    from irrepscope.report.analysis import summary_text

    result = {"rows": [], "unused_orders": [], "baseline_mae": 0.2, "mae_ratio_to_baseline": 0.9, "beats_baseline": False,
              "baseline_name": "zero baseline", "model_mae": 0.18, "unit": "e*Å", "n_molecules": 5, "split": "test",
              "threshold": 0.01, "threshold_ev": 0.0018, "ablation_molecules": 5, "orders": [0, 1]}  # fmt: skip
    text = summary_text(result)
    assert "not clearly better than the zero baseline" in text and "the zero vector" in text


def test_structure_files_without_fluorine_and_shared_molecules(tmp_path, qm9):
    """Composition counts of molecules without F (max Z = 8) work; a molecule in both files is refused."""
    import ase.io
    from ase import Atoms

    from irrepscope.data.composition import element_counts
    from irrepscope.data.xyz import read_extxyz

    def write(path, indices):
        frames = []
        for i in indices:
            z, pos = qm9.structure(int(i))
            atoms = Atoms(numbers=z, positions=pos)
            atoms.info.update(energy=float(qm9.properties["U0_atomization"][i]), qm9_index=int(i))
            frames.append(atoms)
        ase.io.write(path, frames, format="extxyz")

    no_f = [i for i in range(50) if 9 not in qm9.structure(i)[0]][:6]
    write(tmp_path / "a.extxyz", no_f[:4])
    write(tmp_path / "b.extxyz", no_f[3:])
    mols, (a, b) = read_extxyz([tmp_path / "a.extxyz", tmp_path / "b.extxyz"])
    assert int(mols.atomic_numbers.max()) <= 8
    np.testing.assert_array_equal(element_counts(mols, b), element_counts(qm9, np.asarray(no_f[3:])))
    from irrepscope.api import _check_disjoint

    with pytest.raises(IrrepscopeError, match="both"):
        _check_disjoint(mols, a, b)  # molecule no_f[3] is in both files
    _check_disjoint(mols, a[:3], b)


def test_export_refuses_vector_targets(tmp_path, qm9):
    from irrepscope.data.export import write_extxyz

    with pytest.raises(IrrepscopeError, match="vector/tensor"):
        write_extxyz(qm9, np.arange(3), tmp_path / "x.extxyz", "charge_dipole")
