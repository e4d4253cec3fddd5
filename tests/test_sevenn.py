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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise repeatable: with more threads SevenNet's scatter sums change order
    try:
        _zero_scalars_and_reuse(seven, batch)
    finally:
        torch.set_num_threads(threads)


def _zero_scalars_and_reuse(seven, batch):
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


# --- the potential analysis: the model against itself -------------------------------------------------


def _write_frames(path, frames, classes=None):
    import ase.io

    frames = [f.copy() for f in frames]
    for f, c in zip(frames, classes or [None] * len(frames)):
        if c is not None:
            f.info["class"] = c
    ase.io.write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def potential_result(tmp_path_factory):
    import irrepscope as irs

    tmp = tmp_path_factory.mktemp("seven")
    path = _write_frames(tmp / "mixed.extxyz", _frames(), [None, "ionic crystal", None])
    return irs.analyze_sevenn("7net-0", path, tmp / "out", progress=False), tmp


def test_potential_analysis_known_answers(potential_result, seven):
    result, tmp = potential_result
    rows = {(r["block"], r["order"]): r for r in result["rows"]}
    # the last block puts out scalars only: no l > 0 case there
    assert rows[(5, 1)]["verdict"] == "absent" and rows[(5, 1)]["force_change"] is None  # NaN in JSON
    # zeroing every scalar after every block (or after the last) leaves no force: the change is the whole force
    for key in (("all", 0), (5, 0)):
        assert rows[key]["force_change_rel"] == pytest.approx(1.0, rel=1e-6)
    # a per-block value by hand through the hook (on the unrounded positions: the file holds 8 decimals)
    mols = _structures(_frames())
    batch = seven.batch_of(mols, np.arange(3))
    e, f = seven.energy_and_forces(batch)
    e1, f1 = seven.energy_and_forces(batch, lambda i, x: seven.zero_order(i, x, 1) if i == 1 else x)
    atoms = np.array([len(a) for a in _frames()])
    assert rows[(2, 1)]["energy_change_per_atom"] == pytest.approx(np.mean(np.abs((e1 - e).double().numpy()) / atoms), rel=1e-3)
    assert rows[(2, 1)]["force_change"] == pytest.approx((f1 - f).abs().double().mean().item(), rel=1e-3)
    # its interval: a bootstrap over the 3 structures, around the value (a resample may repeat one structure)
    assert rows[(2, 1)]["force_change_lo"] <= rows[(2, 1)]["force_change"] <= rows[(2, 1)]["force_change_hi"]
    assert rows[(2, 1)]["force_change_lo"] < rows[(2, 1)]["force_change_hi"]
    # zeroing every scalar removes the whole force in every resample: an interval of zero width at 1
    assert rows[("all", 0)]["force_change_rel_lo"] == pytest.approx(1.0, rel=1e-6) == rows[("all", 0)]["force_change_rel_hi"]
    assert result["mean_force"] == pytest.approx(f.abs().double().mean().item(), rel=1e-4)
    # classes: the given one, else by periodicity; per class, the same measures on its structures only
    classes = {c["class"]: c for c in result["classes"]}
    assert set(classes) == {"molecule", "ionic crystal", "crystal"}
    assert classes["molecule"]["structures"] == 1 and classes["crystal"]["atoms"] == 8
    graph = batch.atom_graph.numpy()
    mol_force = f[graph == 0].abs().double().mean().item()
    assert classes["molecule"]["mean_force"] == pytest.approx(mol_force, rel=1e-4)
    assert not result.get("force_mae")  # the file has no forces: nothing to compare with
    for name in ("usage.json", "usage.csv", "usage.png", "report.html"):
        assert (tmp / "out" / name).is_file()
    assert "ionic crystal" in (tmp / "out" / "report.html").read_text()


def test_potential_verdicts_follow_the_thresholds():
    from irrepscope.analysis.potential import self_verdict

    nan = float("nan")
    # (lo, hi) intervals of the energy change per atom and of the relative force change
    assert self_verdict((0.002, 0.003), (0.0, 0.0), 1e-3, 0.01) == "used"  # energy alone
    assert self_verdict((0.0, 0.0), (0.02, 0.05), 1e-3, 0.01) == "used"  # forces alone
    assert self_verdict((0.0005, 0.0009), (0.002, 0.009), 1e-3, 0.01) == "unused"
    assert self_verdict((0.0005, 0.0009), (0.005, 0.02), 1e-3, 0.01) == "uncertain"  # the force interval straddles
    assert self_verdict((0.0005, 0.002), (nan, nan), 1e-3, 0.01) == "uncertain"  # no forces: the energy decides
    assert self_verdict((nan, nan), (nan, nan), 1e-3, 0.01) == "absent"


def test_potential_cli_with_labels_and_bad_input(tmp_path, capsys):
    from helpers import one_line_error, run_cli

    frames = _frames()[:2]
    labelled = []
    for a in frames:  # forces of another "level of theory": twice SevenNet's own
        from sevenn.calculator import SevenNetCalculator

        a = a.copy()
        a.calc = SevenNetCalculator("7net-0", device="cpu")
        f = 2 * a.get_forces()
        from ase.calculators.singlepoint import SinglePointCalculator

        a.calc = SinglePointCalculator(a, energy=0.0, forces=f)
        labelled.append(a)
    import ase.io

    path = tmp_path / "labelled.extxyz"
    ase.io.write(path, labelled, format="extxyz")  # with their calculators' forces
    out = tmp_path / "an"
    code = run_cli("analyze", "7net-0", "--structures", str(path), "--out", str(out), "--orders", "1", "--quiet")
    assert code == 0
    assert "force change when an order is zeroed" in capsys.readouterr().out
    import json

    usage = json.loads((out / "usage.json").read_text())
    # labels are twice the model's forces: the model's error is exactly its own mean |F|
    assert usage["force_mae"] == pytest.approx(usage["mean_force"], rel=1e-5)
    assert usage["force_baseline_mae"] == pytest.approx(2 * usage["mean_force"], rel=1e-5)
    assert usage["analysed_orders"] == [1] and all(r["order"] == 1 for r in usage["rows"])
    cases = [
        (["analyze", "7net-0"], "needs --structures"),
        (["analyze", "7net-0", "--structures", str(tmp_path / "none.extxyz")], "no such structure file"),
        (["analyze", "7net-0", "--structures", str(path), "--molecules", "x"], "are for NequIP and MACE models"),
        (["analyze", str(tmp_path), "--structures", str(path)], "--structures is for SevenNet models"),
        (["analyze", "7net-0", "--structures", str(path), "--force-threshold", "nan"], "finite number"),
        (["analyze", "7net-mf-0", "--structures", str(path), "--out", str(tmp_path / "mf")], "give a modal"),
        (["sample-crystals", str(tmp_path / "c.extxyz.gz"), "--crystal", "Xx"], "unknown crystals"),
        (["sample-crystals", str(tmp_path / "c.xyz")], "written as .extxyz.gz"),
    ]
    for args, match in cases:
        one_line_error(capsys, run_cli(*args), match)


def test_crystal_sampling_is_seeded_and_periodic(tmp_path):
    import hashlib

    from irrepscope.data.crystals import sample_crystals
    from irrepscope.data.structures import CLASS
    from irrepscope.data.xyz import read_extxyz

    kw = dict(crystals=["Si", "NaCl"], temperatures=(1000.0,), frames=2, every=1, equilibration=0, progress=False)
    a = sample_crystals(tmp_path / "a.extxyz.gz", **kw)
    b = sample_crystals(tmp_path / "b.extxyz.gz", **kw)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    c = sample_crystals(tmp_path / "c.extxyz.gz", **{**kw, "seed": 1})
    assert a.read_bytes() != c.read_bytes()
    structures, _ = read_extxyz([a], energy_key=None)
    assert len(structures) == 4 and structures.periodic.all()
    assert list(structures.properties[CLASS]) == ["covalent crystal"] * 2 + ["ionic crystal"] * 2
    assert list(structures.properties["temperature_K"]) == [1000.0] * 4
    assert "forces" not in structures.atom_properties  # unlabelled by design
