"""Force fields end to end: xTB-labelled structures, training on energies and forces, metrics, the force analysis."""

import json
from pathlib import Path

import numpy as np
import pytest

import irrepscope as irs
from helpers import one_line_error, run_cli as cli
from irrepscope.analysis.own_model import OwnModel
from irrepscope.data.composition import fit_composition
from irrepscope.data.export import export_split, mace_e0s
from irrepscope.data.split import load_split
from irrepscope.data.structures import FORCES
from irrepscope.data.xtb_md import sample_md
from irrepscope.data.xyz import read_extxyz

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "quick" / "tiny_forces.yaml")


@pytest.fixture(scope="module")
def xtb_file(tmp_path_factory):
    """40 QM9 molecules x 3 frames of GFN2-xTB Langevin MD at 500 K (a few seconds)."""
    path = tmp_path_factory.mktemp("xtb") / "small.extxyz.gz"
    sample_md(path, molecules=40, frames=3, every=5, equilibration=5, seed=0, workers=1, progress=False)
    return path


@pytest.fixture(scope="module")
def force_run(xtb_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ff") / "run"
    code = cli("train", TINY, "--out", str(out), "--quiet", "--set", f"data.source={xtb_file}", "--set", "data.limit=null")
    assert code == 0
    return out


def test_split_keeps_each_molecules_frames_together(force_run, xtb_file):
    structures, _ = read_extxyz([xtb_file], forces_key="forces")
    split = load_split(force_run / "split.json", len(structures))
    index = structures.properties["qm9_index"]
    parts = [set(index[split[name]]) for name in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(len(p) for p in parts) == 40
    assert json.loads((force_run / "split.json").read_text())["meta"]["grouped_by"] == "qm9_index"


def test_test_json_has_force_metrics_beside_independent_baselines(force_run, xtb_file):
    test = json.loads((force_run / "test.json").read_text())
    structures, _ = read_extxyz([xtb_file], forces_key="forces")
    split = load_split(force_run / "split.json", len(structures))
    # the zero-force baseline, computed independently from the file's frames
    import ase.io

    frames = ase.io.read(xtb_file, index=":")
    truth = np.concatenate([frames[i].get_forces() for i in split["test"]])
    assert test["force_baseline_mae"] == pytest.approx(np.mean(np.abs(truth)), rel=1e-12)
    assert test["force_baseline_rmse"] == pytest.approx(np.sqrt(np.mean(truth**2)), rel=1e-12)
    assert test["n_atoms"] == len(truth)
    # the model's forces, recomputed here by autograd, give the same force MAE
    run = irs.load_run(force_run, mols=structures)
    model = OwnModel(run.model, "radius", run.config.model.cutoff)
    (batch,) = list(model.batches(structures, split["test"], len(split["test"])))
    _, forces = model.energy_and_forces(batch)
    assert test["force_mae"] == pytest.approx(np.mean(np.abs(forces.double().numpy() - truth)), rel=1e-9)
    n = np.array([len(frames[i]) for i in split["test"]])
    energy = np.array([frames[i].get_potential_energy() for i in split["test"]])
    assert test["mae_per_atom_ev"] == pytest.approx(np.mean(np.abs(batch_energy(run, structures, split) - energy) / n), rel=1e-6)
    rows = (force_run / "metrics.csv").read_text().splitlines()
    assert "val_force_mae" in rows[0] and rows[1].split(",")[5] != ""


def batch_energy(run, structures, split):
    from irrepscope.training.evaluate import predict

    return predict(run.model, structures, split["test"], run.config)


def test_force_training_learns(force_run):
    """Two epochs on 96 frames: the forces are already better than predicting none."""
    test = json.loads((force_run / "test.json").read_text())
    assert test["force_mae"] < test["force_baseline_mae"]


def test_analysis_reports_force_usage(force_run, xtb_file):
    structures, _ = read_extxyz([xtb_file], forces_key="forces")
    run = irs.load_run(force_run, mols=structures)
    result = irs.analyze(run, embedding="pca", map_molecules=10, probe_molecules=20, progress=False)
    rows = {(r["block"], r["order"]): r for r in result["rows"]}
    # the scalar readout sees only l = 0 of the last block: zeroing l > 0 there changes no force
    for l in (1, 2):
        assert rows[(2, l)]["force_delta_mae"] == 0.0 and rows[(2, l)]["force_verdict"] == "unused"
    # zeroing l = 0 after the last block or after every block leaves the same (constant) energy: forces zero
    assert rows[("all", 0)]["force_delta_mae"] == pytest.approx(result["force_baseline_mae"] - result["force_mae"], rel=1e-9)
    # a per-block value, recomputed by hand through the hook
    split = run.split
    model = run.analysed()
    idx = split["test"]
    (batch,) = list(model.batches(structures, idx, len(idx)))
    truth = structures.atom_values(FORCES, idx)
    _, base = model.energy_and_forces(batch)
    _, ablated = model.energy_and_forces(batch, lambda i, x: model.zero_order(i, x, 1) if i == 0 else x)
    expected = np.mean(np.abs(ablated.double().numpy() - truth)) - np.mean(np.abs(base.double().numpy() - truth))
    assert rows[(1, 1)]["force_delta_mae"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result["force_mae"] == pytest.approx(np.mean(np.abs(base.double().numpy() - truth)), rel=1e-9)
    # Label-free measures (the model against itself): the same cases, known answers
    for l in (1, 2):  # the readout ignores l > 0 of the last block: nothing changes
        assert rows[(2, l)]["energy_change_per_atom"] == 0.0 and rows[(2, l)]["force_change"] == 0.0
    # without any scalar the forces vanish: the change is the model's own mean |F|, relative change 1
    assert rows[("all", 0)]["force_change"] == pytest.approx(np.mean(np.abs(base.double().numpy())), rel=1e-9)
    assert rows[("all", 0)]["force_change_rel"] == pytest.approx(1.0, rel=1e-9)
    e_base, _ = model.energy_and_forces(batch)
    e_abl, _ = model.energy_and_forces(batch, lambda i, x: model.zero_order(i, x, 1) if i == 0 else x)
    atoms = np.diff(structures.atom_ptr)[idx]
    by_hand = np.mean(np.abs(e_abl.double().numpy() - e_base.double().numpy()) / atoms)
    assert rows[(1, 1)]["energy_change_per_atom"] == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    assert rows[(1, 1)]["force_change"] == pytest.approx(np.mean(np.abs(ablated.double().numpy() - base.double().numpy())), rel=1e-9)


def test_cli_analysis_and_predict_with_forces(force_run, xtb_file, tmp_path, capsys):
    assert cli("analyze", str(force_run), "--embedding", "pca", "--quiet", "--map-molecules", "10") == 0
    usage = json.loads((force_run / "analysis" / "usage.json").read_text())
    assert usage["force_unit"] == "eV/Å" and all("force_verdict" in r for r in usage["rows"])
    assert "force_delta_mae" in (force_run / "analysis" / "usage.csv").read_text().splitlines()[0]
    assert "zero-force baseline" in (force_run / "analysis" / "report.html").read_text()
    import ase.io

    ase.io.write(tmp_path / "two.xyz", ase.io.read(xtb_file, index="0:2"), format="xyz")
    capsys.readouterr()
    assert cli("predict", str(force_run), str(tmp_path / "two.xyz"), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and np.asarray(out[0]["forces"]).shape == (len(ase.io.read(tmp_path / "two.xyz", index=0)), 3)


def test_extxyz_round_trips_energies_and_forces(xtb_file, tmp_path):
    structures, _ = read_extxyz([xtb_file], forces_key="forces")
    split = {"train": np.arange(0, 60), "val": np.arange(60, 90), "test": np.arange(90, 120)}
    export_split(structures, split, tmp_path, "energy")
    again, (train, test) = read_extxyz([tmp_path / "train.extxyz", tmp_path / "test.extxyz"], forces_key="forces")
    both = np.concatenate([split["train"], split["test"]])
    np.testing.assert_array_equal(again.properties["energy"], structures.properties["energy"][both])
    np.testing.assert_array_equal(again.atom_properties["forces"], structures.subset(both).atom_properties["forces"])
    np.testing.assert_array_equal(again.positions, structures.subset(both).positions)
    np.testing.assert_array_equal(again.properties["qm9_index"], structures.properties["qm9_index"][both])
    # the same labels under MACE's keys, and MACE's E0s: the composition fit on the training split
    mace, _ = read_extxyz([tmp_path / "train.extxyz", tmp_path / "test.extxyz"], energy_key="REF_energy", forces_key="REF_forces")
    np.testing.assert_array_equal(mace.properties["energy"], again.properties["energy"])
    np.testing.assert_array_equal(mace.atom_properties["forces"], again.atom_properties["forces"])
    e0s = json.loads((tmp_path / "mace_E0s.json").read_text())
    fit = fit_composition(structures, split["train"], "energy")
    present = np.unique(structures.subset(np.arange(90)).atomic_numbers)  # train and val: MACE's element table
    assert e0s == {str(z): fit.per_element[z] for z in present} and fit.n_fit == 60
    meta = json.loads((tmp_path / "export.json").read_text())["mace"]
    assert meta["energy_key"] == "REF_energy" and meta["forces_key"] == "REF_forces" and meta["E0s"] == "mace_E0s.json"
    assert "60 training structures" in meta["E0s_rule"]
    e0s, why = mace_e0s(structures, split, "homo")  # an intensive target has no per-element energies
    assert e0s is None and "not extensive" in why


def write_frames(path, frames_spec, xtb_file):
    """Frames of the xTB file with their labels edited by ``frames_spec(atoms, k)``."""
    import ase.io

    frames = ase.io.read(xtb_file, index="0:30")  # 10 molecules
    for k, atoms in enumerate(frames):
        frames_spec(atoms, k)
    ase.io.write(path, frames, format="extxyz")
    return path


def _no_forces(atoms, k):
    e = atoms.get_potential_energy()
    atoms.calc = None
    atoms.info["energy"] = e


def _nan_force(atoms, k):
    if k == 2:
        atoms.calc.results["forces"][0, 1] = np.nan


def _nan_energy(atoms, k):
    if k == 1:
        atoms.calc.results["energy"] = np.nan


def _periodic(atoms, k):
    atoms.set_cell([12.0, 12.0, 12.0])
    atoms.set_pbc(True)


@pytest.mark.parametrize(
    "edit, sets, match",
    [
        (_no_forces, [], "has no per-atom forces 'forces'"),
        (_nan_force, [], "not finite"),
        (_nan_energy, [], "'energy' is nan"),
        (_periodic, [], "periodic boundaries"),
        (None, ["data.graph=bond"], "data.graph: radius"),
        (None, ["model.radial_envelope=none"], "radial_envelope: polynomial"),
        (None, ["data.energy_key=total_energy"], "has no energy 'total_energy'"),
        (None, ["data.target=U0_atomization"], "data.target must be 'energy'"),
        (None, ["data.source=qm9", "data.target=U0_atomization"], "training on forces needs data.target: energy"),
        (None, ["data.source=/nonexistent.extxyz"], "no such structure file"),
        (None, ["train.force_weight=-1"], "train.force_weight must be"),
        (None, ["train.force_weight=0", "train.energy_weight=0"], "nothing to learn"),
    ],
)
def test_bad_force_field_input_is_one_line(edit, sets, match, xtb_file, tmp_path, capsys):
    source = write_frames(tmp_path / "edited.extxyz", edit, xtb_file) if edit is not None else xtb_file
    args = ["train", TINY, "--out", str(tmp_path / "run"), "--quiet", "--set", "data.limit=null"]
    if not any(s.startswith("data.source=") for s in sets):  # each key once: --set twice is an error
        args += ["--set", f"data.source={source}"]
    for s in sets:
        args += ["--set", s]
    one_line_error(capsys, cli(*args), match)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_misshaped_forces_are_refused(xtb_file, tmp_path):
    from irrepscope.errors import IrrepscopeError

    text = Path(write_frames(tmp_path / "ok.extxyz", lambda a, k: None, xtb_file)).read_text()
    # drop the last force column of every atom line: the file still parses as extxyz with a 2-column forces
    bad = text.replace("forces:R:3", "forces:R:2")
    bad = "\n".join(" ".join(line.split()[:-1]) if len(line.split()) == 7 else line for line in bad.splitlines())
    (tmp_path / "bad.extxyz").write_text(bad + "\n")
    with pytest.raises(IrrepscopeError, match="forces"):
        read_extxyz([tmp_path / "bad.extxyz"], forces_key="forces")


def test_a_changed_source_file_is_refused(xtb_file, tmp_path, capsys):
    """The split indexes the file's frames: a run whose structure file changed since cannot be evaluated or resumed."""
    import shutil

    source = tmp_path / "frames.extxyz.gz"
    shutil.copy(xtb_file, source)
    run = tmp_path / "run"
    args = ["--set", f"data.source={source}", "--set", "data.limit=null", "--set", "train.epochs=1", "--set", "train.max_train_batches=1"]
    assert cli("train", TINY, "--out", str(run), "--quiet", *args) == 0
    assert cli("evaluate", str(run)) == 0
    write_frames(tmp_path / "other.extxyz", lambda a, k: None, xtb_file)  # 30 of the file's 120 frames
    import gzip

    source.write_bytes(gzip.compress((tmp_path / "other.extxyz").read_bytes()))
    capsys.readouterr()
    one_line_error(capsys, cli("evaluate", str(run)), "is not the file this run was split on")
    one_line_error(capsys, cli("train", "--resume", str(run), "--set", "train.epochs=2"), "is not the file this run was split on")
    one_line_error(capsys, cli("analyze", str(run), "--quiet"), "is not the file this run was split on")


def test_structures_from_lists_keep_strings_whole():
    from irrepscope.data.structures import Structures

    s = Structures.from_arrays(
        [(np.array([1, 1]), np.eye(3)[:2]), (np.array([8]), np.zeros((1, 3)))], {"energy": [1.0, 2.0], "smiles": ["[H][H]", "O"]}
    )
    sub = s.subset([1])
    assert sub.properties["smiles"].tolist() == ["O"] and sub.properties["energy"].tolist() == [2.0]


def test_group_split_keeps_known_molecules_together_beside_unlabelled_frames():
    from irrepscope.data.sources import split_groups
    from irrepscope.data.split import random_split
    from irrepscope.data.structures import Structures

    index = np.array([5, 5, 7, 7, 9, 9, -1, -1, 11, 11, 13, 13])
    s = Structures.from_arrays([(np.array([1]), np.zeros((1, 3)))] * len(index), {"qm9_index": index})
    groups = split_groups(s, "auto")
    assert groups is not None and len(np.unique(groups)) == 7
    split = random_split(len(index), (0.6, 0.2, 0.2), seed=1, groups=groups)
    sides = {name: set(index[idx][index[idx] >= 0]) for name, idx in split.items()}
    assert not (sides["train"] & sides["test"]) and not (sides["train"] & sides["val"])


def test_the_shipped_set_is_what_its_command_writes(tmp_path):
    """Two molecules sampled with the shipped set's parameters equal their frames in the shipped file, bit for bit.

    The subset of a seed is a prefix of one permutation and each molecule's frames depend on (seed, QM9 index)
    only, so this checks the committed file against its regeneration command (README "Force fields").
    """
    import json

    from irrepscope.data.sources import SHIPPED, SHIPPED_SOURCES

    shipped = SHIPPED / SHIPPED_SOURCES["qm9_xtb"]
    params = json.loads(Path(str(shipped) + ".json").read_text())["parameters"]
    assert params["molecules"] == 1000 and params["frames"] == 4 and params["temperature_K"] == 500.0
    small = tmp_path / "two.extxyz.gz"
    result = sample_md(
        small, molecules=2, frames=params["frames"], every=params["every"], equilibration=params["equilibration"],
        temperature=params["temperature_K"], seed=params["seed"], workers=1, progress=False,
    )  # fmt: skip
    full, _ = read_extxyz([shipped])
    mine, _ = read_extxyz([small])
    assert len(full) == 4000 and FORCES in full.atom_properties
    rows = np.flatnonzero(np.isin(full.properties["qm9_index"], result.molecules))
    part = full.subset(rows)
    np.testing.assert_array_equal(part.positions, mine.positions)
    np.testing.assert_array_equal(part.atom_properties[FORCES], mine.atom_properties[FORCES])
    np.testing.assert_array_equal(part.properties["energy"], mine.properties["energy"])
