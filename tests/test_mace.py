"""MACE models behind the analysis interface (``irrepscope[mace]``, in MACE's own environment: e3nn 0.4.4).

A tiny MACE force field (8 channels, max_L 2, 2 layers) is trained here by MACE's own
``mace_run_train`` on frames of the shipped GFN2-xTB set, written by our extxyz export;
then it is loaded, hooked, ablated and analysed end to end. Its predictions are checked
against MACE's own ASE calculator.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from helpers import one_line_error, run_cli  # noqa: E402

from irrepscope.analysis.features import collect  # noqa: E402
from irrepscope.analysis.mace_model import MaceModel  # noqa: E402
from irrepscope.data.export import export_split  # noqa: E402
from irrepscope.data.sources import source_path  # noqa: E402
from irrepscope.data.structures import ENERGY, Structures  # noqa: E402
from irrepscope.data.xyz import read_extxyz  # noqa: E402

# frames of whole molecules (4 frames each): 12 molecules to train on, 3 to validate, 5 to analyse
TRAIN, VALID, TEST = np.arange(0, 48), np.arange(48, 60), np.arange(60, 80)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mace" / "xtb_forces.yaml"


@pytest.fixture(scope="module")
def shipped() -> Structures:
    mols, _ = read_extxyz([source_path("qm9_xtb")], energy_key="energy", forces_key="forces")
    return mols


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shipped) -> Path:
    """``tiny.model`` as mace_run_train writes it (about 15 s on 2 cores) from the shipped config
    (``configs/mace/xtb_forces.yaml``, made tiny on the command line), beside the export it read."""
    root = tmp_path_factory.mktemp("mace")
    export_split(shipped, {"train": TRAIN, "val": VALID, "test": TEST}, root, ENERGY)  # REF_ keys and mace_E0s.json
    command = [
        str(Path(sys.executable).parent / "mace_run_train"), f"--config={CONFIG}", "--name=tiny", f"--work_dir={root}",
        f"--train_file={root / 'train.extxyz'}", f"--valid_file={root / 'val.extxyz'}", f"--test_file={root / 'test.extxyz'}",
        f"--E0s={root / 'mace_E0s.json'}", "--num_channels=8", "--r_max=4.0", "--batch_size=8", "--max_num_epochs=2",
        "--default_dtype=float64",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "tiny.model").is_file() and (root / "tiny_compiled.model").is_file()
    assert "energy_key 'energy'" not in done.stderr + done.stdout  # MACE read its own keys: no rename warning
    return root


@pytest.fixture(scope="module")
def mace_model(trained) -> MaceModel:
    return MaceModel.load(trained / "tiny.model")


def _test_set(trained) -> Structures:
    mols, _ = read_extxyz([trained / "test.extxyz"], energy_key="energy", forces_key="forces")
    return mols


def test_predictions_are_maces_own(mace_model, trained):
    """Energies and forces through irrepscope equal MACE's ASE calculator's on the same file."""
    import ase.io
    from mace.calculators import MACECalculator

    mols = _test_set(trained)
    batch = mace_model.batch_of(mols, np.arange(len(mols)))
    energies, forces = mace_model.energy_and_forces(batch)
    with torch.no_grad():
        assert torch.equal(mace_model.forward(batch), energies)
    calc = MACECalculator(model_paths=str(trained / "tiny.model"), device="cpu", default_dtype="float64")
    for k, atoms in enumerate(ase.io.read(trained / "test.extxyz", index=":")):
        atoms.calc = calc
        assert energies[k].item() == pytest.approx(atoms.get_potential_energy(), rel=0, abs=1e-9)
        assert np.abs(forces[batch.atom_graph == k].numpy() - atoms.get_forces()).max() < 1e-9
    assert [str(i) for i in mace_model.block_irreps] == ["8x0e+8x1o+8x2e", "8x0e"]
    assert mace_model.orders == [0, 1, 2] and mace_model.block_names == ["products.0", "products.1"]


def test_hooks_see_what_hand_written_hooks_see_and_identity_changes_nothing(mace_model, trained):
    mols = _test_set(trained)
    batch = mace_model.batch_of(mols, np.arange(len(mols)))
    seen, ours = [], []
    handles = [p.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())) for p in mace_model.model.products]
    try:
        e0, f0 = mace_model.energy_and_forces(batch)
    finally:
        for h in handles:
            h.remove()

    def keep(i, x):
        ours.append(x.detach().clone())
        return x

    e1, f1 = mace_model.energy_and_forces(batch, keep)
    assert len(seen) == len(ours) == 2 and all(torch.equal(a, b) for a, b in zip(seen, ours))
    # A hook that returns its input changes nothing: energies to the bit; forces (autograd through
    # MACE's scatter sums, whose float64 summation order can differ between passes) to 1e-12 eV/Å.
    assert torch.equal(e0, e1)
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-12)
    e2, f2 = mace_model.energy_and_forces(batch, lambda i, x: x.clone())
    assert torch.equal(e0, e2)
    torch.testing.assert_close(f2, f0, rtol=0, atol=1e-12)
    # and the hook does act: zeroing l = 1 after the first layer changes energies and forces
    e3, f3 = mace_model.force_ablation(batch, 0, 1)
    assert (e3 - e0).abs().max() > 1e-6 and (f3 - f0).abs().max() > 1e-6


def _rotated(mols: Structures, rotation: np.ndarray) -> Structures:
    frames = [mols.structure(i) for i in range(len(mols))]
    return Structures.from_arrays([(z, pos @ rotation.T + np.array([0.3, -1.2, 2.0])) for z, pos in frames])


@pytest.mark.parametrize("reflect", [False, True])
def test_ablated_energies_are_invariant_and_forces_equivariant(mace_model, trained, reflect):
    mols = _test_set(trained)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    q = q * np.sign(np.linalg.det(q)) * (-1 if reflect else 1)  # a rotation, or a rotation times -1
    moved = _rotated(mols, q)
    idx = np.arange(len(mols))
    perm = np.random.default_rng(4).permutation(len(mols))  # and the structures in another order
    for block, l in ((None, 1), (None, 2), (0, 1)):
        e, f = mace_model.force_ablation(mace_model.batch_of(mols, idx), block, l)
        batch = mace_model.batch_of(moved, perm)
        e_r, f_r = mace_model.force_ablation(batch, block, l)
        assert torch.allclose(e_r, e[perm], rtol=0, atol=1e-9)
        f_by = [f[mace_model.batch_of(mols, idx).atom_graph == k].numpy() for k in range(len(mols))]
        for k, j in enumerate(perm):
            assert np.abs(f_r[batch.atom_graph == k].numpy() - f_by[j] @ q.T).max() < 1e-9


def test_loading_leaves_the_callers_state_as_it_was(trained):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    before = (torch.get_default_dtype(), os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
              torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # fmt: skip
    model = MaceModel.load(trained / "tiny.model")
    model.forward(model.batch_of(_test_set(trained), np.arange(4)))
    after = (torch.get_default_dtype(), os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
             torch.random.get_rng_state(), np.random.get_state()[1], random.getstate())  # fmt: skip
    assert before[0] == after[0] and before[1] == after[1]
    assert torch.equal(before[2], after[2]) and np.array_equal(before[3], after[3]) and before[4] == after[4]


def test_the_analysis_runs_end_to_end_with_forces(mace_model, trained, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = run_cli(
        "analyze", str(trained / "tiny.model"), "--molecules", str(trained / "test.extxyz"), "--train-molecules",
        str(trained / "train.extxyz"), "--out", str(out), "--embedding", "pca", "--resamples", "200", "--quiet",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # no e3nn 0.4 or MACE noise
    import json

    usage = json.loads((out / "usage.json").read_text())
    assert usage["family"] == "mace" and usage["num_blocks"] == 2 and usage["n_molecules"] == len(TEST)
    assert "force_mae" in usage and usage["baseline_mae"] > 0
    rows = {(r["block"], r["order"]): r for r in usage["rows"]}
    assert rows[(2, 1)]["verdict"] == "absent" and rows[(2, 2)]["verdict"] == "absent"  # the last layer is scalars only
    # the all-layers ablation of l = 1 equals zeroing it by hand on the same structures
    mols = _test_set(trained)
    sub = np.asarray(sorted(range(len(mols))))
    batch = mace_model.batch_of(mols, sub)
    with torch.no_grad():
        manual = mace_model.forward(batch, lambda i, x: mace_model.zero_order(i, x, 1) if i == 0 else x)
        base = mace_model.forward(batch)
    delta = float(np.mean(np.abs(manual.numpy() - mols.properties[ENERGY])) - np.mean(np.abs(base.numpy() - mols.properties[ENERGY])))
    assert rows[("all", 1)]["ablation_delta_mae_ev"] == pytest.approx(delta, rel=1e-9, abs=1e-12)
    assert (out / "report.html").is_file()


def test_collect_gives_the_same_per_molecule_numbers_in_any_batching(mace_model, trained):
    mols = _test_set(trained)
    idx = np.arange(len(mols))
    a = collect(mace_model, mols, idx, target=ENERGY, batch_size=3)
    b = collect(mace_model, mols, idx, target=ENERGY, batch_size=20, gradient_positions=np.arange(0, len(idx), 2))
    np.testing.assert_allclose(a.prediction, b.prediction, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.ablation_prediction[:, :, ::2], b.ablation_prediction, rtol=0, atol=1e-10)


def test_a_compiled_model_is_refused_with_the_file_to_pass(trained, capsys):
    code = run_cli("analyze", str(trained / "tiny_compiled.model"), "--molecules", str(trained / "test.extxyz"),
                   "--train-molecules", str(trained / "train.extxyz"), "--out", str(trained / "x"))  # fmt: skip
    one_line_error(capsys, code, "pass tiny.model instead")
    renamed = trained / "renamed.model"
    renamed.write_bytes((trained / "tiny_compiled.model").read_bytes())
    code = run_cli("analyze", str(renamed), "--molecules", str(trained / "test.extxyz"),
                   "--train-molecules", str(trained / "train.extxyz"), "--out", str(trained / "y"))  # fmt: skip
    one_line_error(capsys, code, "compiled (TorchScript) MACE model")


def test_bad_mace_input_is_one_line(trained, shipped, tmp_path, capsys):
    not_mace = tmp_path / "other.model"
    torch.save({"a": 1}, not_mace)
    code = run_cli("analyze", str(not_mace), "--molecules", str(trained / "test.extxyz"),
                   "--train-molecules", str(trained / "train.extxyz"), "--out", str(tmp_path / "a"))  # fmt: skip
    one_line_error(capsys, code, "not a MACE model")
    code = run_cli("analyze", str(tmp_path / "missing.model"), "--molecules", str(trained / "test.extxyz"),
                   "--train-molecules", str(trained / "train.extxyz"), "--out", str(tmp_path / "b"))  # fmt: skip
    one_line_error(capsys, code, "MACE model not found")
    # an element the model was not trained on is refused by name (F: none in the training frames)
    model = MaceModel.load(trained / "tiny.model")
    fluorine = Structures.from_arrays([(np.array([9, 1]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.93]]))])
    with pytest.raises(Exception, match=r"elements \[9\] are unknown"):
        model.batch_of(fluorine, np.arange(1))
