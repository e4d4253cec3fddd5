"""SevenNet's pretrained universal potentials behind the analysis interface (``irrepscope[sevenn]``).

The checkpoints ship inside the sevenn wheel: nothing reaches the network. The model's
energies and forces are checked against SevenNet's own ASE calculator on a rattled
molecule and a rattled periodic crystal in one batch; hooks, ablations and the refusals
of bad input on the same structures.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")

from ase.build import bulk, molecule  # noqa: E402

from irrepscope.analysis.sevenn_model import SevenNetModel, is_sevenn_model, load_sevenn  # noqa: E402
from irrepscope.data.structures import Structures  # noqa: E402
from irrepscope.errors import IrrepscopeError  # noqa: E402


def _frames():
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    salt = bulk("NaCl", "rocksalt", a=5.64).repeat(2)  # 16 atoms, periodic
    salt.rattle(0.05, seed=2)
    silicon = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms: periodic images inside the 5 Å cutoff
    silicon.rattle(0.05, seed=3)
    return [ethanol, salt, silicon]


def _structures(frames) -> Structures:
    return Structures.from_arrays(
        [(a.get_atomic_numbers(), a.get_positions()) for a in frames],
        cell=np.array([a.get_cell().array for a in frames]),
        pbc=np.array([a.get_pbc() for a in frames]),
    )


@pytest.fixture(scope="module")
def seven():
    return SevenNetModel.load("7net-0")


def test_energies_and_forces_equal_sevennets_own_calculator(seven):
    from sevenn.calculator import SevenNetCalculator

    frames = _frames()
    batch = seven.batch_of(_structures(frames), np.arange(len(frames)))
    energies, forces = seven.energy_and_forces(batch)
    with torch.no_grad():  # energies alone run without the force module, also under no_grad
        assert torch.allclose(seven.forward(batch), energies, rtol=0, atol=1e-4)
    calc = SevenNetCalculator("7net-0", device="cpu")
    for k, atoms in enumerate(frames):
        atoms.calc = calc
        assert energies[k].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
        mine = forces[batch.atom_graph == k].numpy()
        assert np.abs(mine - atoms.get_forces()).max() < 1e-4
    assert seven.block_irreps[0] == seven.block_irreps[3] and str(seven.block_irreps[4]) == "128x0e"
    assert seven.orders == [0, 1, 2] and seven.num_blocks == 5


def test_energy_invariant_and_forces_equivariant_under_a_rotation_with_its_cell(seven):
    from scipy.spatial.transform import Rotation

    frames = _frames()
    rot = Rotation.from_euler("zyx", [0.3, -1.1, 2.0]).as_matrix()
    turned = [f.copy() for f in frames]
    for a in turned:
        a.set_cell(a.get_cell().array @ rot.T, scale_atoms=False)
        a.set_positions(a.get_positions() @ rot.T)
    e0, f0 = seven.energy_and_forces(seven.batch_of(_structures(frames), np.arange(3)))
    e1, f1 = seven.energy_and_forces(seven.batch_of(_structures(turned), np.arange(3)))
    assert torch.allclose(e0, e1, atol=2e-4)
    assert torch.allclose(f0 @ torch.as_tensor(rot.T, dtype=f0.dtype), f1, atol=2e-4)


def test_zeroing_every_scalar_leaves_no_force_and_batches_are_reusable(seven):
    """The last block puts out scalars only: zeroing l = 0 after every block leaves a per-element constant energy."""
    batch = seven.batch_of(_structures(_frames()), np.arange(3))
    e, f = seven.energy_and_forces(batch)
    _, f_zero = seven.force_ablation(batch, None, 0)
    assert f_zero.abs().max().item() == 0.0
    _, f_l1 = seven.force_ablation(batch, None, 1)
    assert (f_l1 - f).abs().mean() > 0.01 * f.abs().mean()  # l = 1 matters for these forces
    e_again, f_again = seven.energy_and_forces(batch)  # the batch was not changed by the runs
    assert torch.equal(e, e_again) and torch.equal(f, f_again)


def test_features_seen_by_a_hook_are_not_overwritten_later(seven):
    batch = seven.batch_of(_structures(_frames()), np.arange(3))
    kept = []

    def keep(i, x):
        kept.append((x, x.clone()))
        return x

    with torch.no_grad():
        seven.forward(batch, keep)
    assert len(kept) == 5 and all(torch.equal(a, b) for a, b in kept)
    assert [x.shape[1] for x, _ in kept] == [irreps.dim for irreps in seven.block_irreps]


def test_bad_models_modals_and_elements_are_refused(seven, tmp_path):
    assert is_sevenn_model("7net-0") and is_sevenn_model("7NET-L3I5") and is_sevenn_model("my.pth")
    assert not is_sevenn_model("runs/demo")
    with pytest.raises(IrrepscopeError, match="not a SevenNet model"):
        load_sevenn("7net-1")
    with pytest.raises(IrrepscopeError, match="not found"):
        load_sevenn(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(IrrepscopeError, match="cannot load SevenNet model"):
        load_sevenn(junk)
    with pytest.raises(IrrepscopeError, match="multi-fidelity: give a modal"):
        SevenNetModel.load("7net-mf-0")
    with pytest.raises(IrrepscopeError, match="has no modal"):
        SevenNetModel(seven.model, seven.config, modal="PBE")
    odd = Structures.from_arrays([(np.array([1, 99]), np.array([[0.0, 0, 0], [1.0, 0, 0]]))])
    with pytest.raises(IrrepscopeError, match=r"elements \[99\] are unknown"):
        seven.batch_of(odd, np.array([0]))


def test_multi_fidelity_model_runs_with_its_modal():
    mf = SevenNetModel.load("7net-mf-0", modal="PBE")
    frames = _frames()[:2]
    energies, forces = mf.energy_and_forces(mf.batch_of(_structures(frames), np.arange(2)))
    assert torch.isfinite(energies).all() and forces.shape == (sum(len(a) for a in frames), 3)
