"""GFN2-xTB molecular-dynamics sampling of QM9 (irrepscope.data.xtb_md): labels, determinism, resume, errors."""

import fcntl
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("tblite")

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402
from tblite.ase import TBLite  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from irrepscope.data import xtb_md  # noqa: E402
from irrepscope.data.md import thermalize  # noqa: E402
from irrepscope.data.qm9 import load_qm9  # noqa: E402
from irrepscope.errors import IrrepscopeError  # noqa: E402

# Tiny settings: a few ms of MD per molecule.
TINY = dict(molecules=3, frames=2, every=3, equilibration=2, temperature=500.0, seed=7, progress=False)


def _read(path):
    return ase.io.read(path, index=":")


def _direct(atoms):
    """tblite called directly, on one thread, on ``atoms``' positions."""
    fresh = Atoms(numbers=atoms.get_atomic_numbers(), positions=atoms.get_positions())
    fresh.calc = TBLite(method="GFN2-xTB", verbosity=0)
    with threadpool_limits(limits=1):
        return fresh.get_potential_energy(), fresh.get_forces()


@pytest.fixture(scope="module")
def qm9m():
    return load_qm9(progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run: (result, path, bytes)."""
    path = tmp_path_factory.mktemp("ref") / "md.extxyz.gz"
    result = xtb_md.sample_md(path, **TINY)
    return result, path, path.read_bytes()


def test_file_round_trips_with_labels_and_metadata(reference):
    result, path, _ = reference
    frames = _read(path)
    assert result.path == path and result.skipped == {} and len(result.molecules) == 3
    assert result.frames == len(frames) == 3 * TINY["frames"]
    assert not os.path.exists(f"{path}.parts"), "the work directory is removed once the output is written"
    assert result.molecules == sorted(result.molecules)
    assert [int(a.info["qm9_index"]) for a in frames] == [q for q in result.molecules for _ in range(2)]
    for k, atoms in enumerate(frames):
        assert atoms.info["method"] == "GFN2-xTB"
        assert float(atoms.info["temperature_K"]) == 500.0 and int(atoms.info["seed"]) == 7
        assert int(atoms.info["frame"]) == k % 2
        assert int(atoms.info["md_step"]) == TINY["equilibration"] + (k % 2) * TINY["every"]
        # The file holds exactly what tblite gives on the written positions: energy to the last bit
        # (written in full), forces to extxyz's 8 decimals.
        energy, forces = _direct(atoms)
        assert math.isclose(atoms.get_potential_energy(), energy, rel_tol=1e-12)
        np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1.0e-8)
        assert np.abs(forces).max() > 1e-3, "off equilibrium"
    # the raw text uses ASE's standard keys
    header = gzip.decompress(path.read_bytes()).decode().splitlines()[1]
    assert "energy=" in header and ":forces:R:3" in header
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["frames_written"] == 6 and sidecar["skipped"] == {}
    assert sidecar["parameters"]["seed"] == 7 and sidecar["parameters"]["method"] == "GFN2-xTB"


def test_tblite_forces_match_finite_differences(qm9m):
    """The label source: forces are minus the gradient of the energy (central differences, h = 1e-4 Å)."""
    indices = xtb_md._qm9_indices(qm9m)
    for q in (1, 3):  # methane, water
        z, pos = xtb_md._qm9_geometry(qm9m, int(np.searchsorted(indices, q)))
        pos = pos + np.random.default_rng(q).normal(scale=0.05, size=pos.shape)  # off equilibrium
        atoms = Atoms(numbers=z, positions=pos)
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        with threadpool_limits(limits=1):
            forces = atoms.get_forces()
            h, numeric = 1e-4, np.zeros_like(pos)
            for i in range(len(z)):
                for d in range(3):
                    energies = []
                    for sign in (1, -1):
                        shifted = pos.copy()
                        shifted[i, d] += sign * h
                        atoms.positions = shifted
                        energies.append(atoms.get_potential_energy())
                    numeric[i, d] = -(energies[0] - energies[1]) / (2 * h)
        assert np.abs(forces).max() > 0.1
        np.testing.assert_allclose(forces, numeric, rtol=0, atol=1e-4)


def test_same_call_same_bytes_and_any_worker_count(reference, tmp_path):
    _, path, data = reference
    again = xtb_md.sample_md(tmp_path / "again.extxyz.gz", **TINY).path.read_bytes()
    assert again == data, "the same call must write the same bytes (the file name is not in the gzip header)"
    parallel = xtb_md.sample_md(tmp_path / "w2.extxyz.gz", workers=2, **TINY).path.read_bytes()
    assert parallel == data, "workers=2 must write what workers=1 writes"
    # deterministic gzip header: no mtime, no file name
    assert data[:2] == b"\x1f\x8b" and data[3] & 0x08 == 0 and data[4:8] == b"\0\0\0\0"
    plain = xtb_md.sample_md(tmp_path / "plain.extxyz", **TINY).path.read_bytes()
    assert plain == gzip.decompress(data)


def test_a_molecule_does_not_depend_on_the_rest_of_the_set(reference, tmp_path):
    result, path, _ = reference
    q = result.molecules[1]
    settings = {k: v for k, v in TINY.items() if k != "molecules"}
    alone = xtb_md.sample_md(tmp_path / "one.extxyz", qm9_index=q, **settings)
    text = gzip.decompress(path.read_bytes()).decode()
    assert alone.path.read_text() in text
    # a larger subset for the same seed contains the smaller one
    bigger = xtb_md._select(np.arange(1, 1001), 10, None, 7)
    assert set(xtb_md._select(np.arange(1, 1001), 3, None, 7)) <= set(bigger)


KILLED_RUN = """
import sys, time
from irrepscope.data import xtb_md
original, calls = xtb_md._sample_molecule, []
def stall_on_second(task, on_frame=None):
    if calls:
        time.sleep(300)  # killed here, with the first molecule's part on disk
    calls.append(task[0])
    return original(task, on_frame)
xtb_md._sample_molecule = stall_on_second
xtb_md.sample_md(sys.argv[1], **{kwargs})
"""


def test_resume_after_kill_gives_the_same_bytes(reference, tmp_path):
    _, _, data = reference
    out = tmp_path / "killed.extxyz.gz"
    parts = tmp_path / "killed.extxyz.gz.parts"
    script = tmp_path / "killed_run.py"
    script.write_text(textwrap.dedent(KILLED_RUN.replace("{kwargs}", repr(TINY))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(parts.glob("*.extxyz")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists() and (parts / "manifest.json").is_file()
    assert len(list(parts.glob("*.extxyz"))) == 1

    # other parameters into the same work directory: a one-line error, nothing touched
    with pytest.raises(IrrepscopeError, match="other parameters") as err:
        xtb_md.sample_md(out, **{**TINY, "frames": 3})
    assert "\n" not in str(err.value) and "frames" in str(err.value)
    assert len(list(parts.glob("*.extxyz"))) == 1 and not out.exists()

    (parts / ".000001.extxyz.abc.tmp").write_text("half-written by the killed run")
    result = xtb_md.sample_md(out, **TINY)
    assert out.read_bytes() == data
    assert result.frames == 6 and not parts.exists()
    # an identical call with the output in place computes nothing and reports the same
    again = xtb_md.sample_md(out, **TINY)
    assert again.molecules == result.molecules and again.frames == 6 and out.read_bytes() == data


def test_a_failing_molecule_is_recorded_and_left_out(reference, tmp_path, monkeypatch):
    result, _, data = reference
    bad_scf, bad_energy = result.molecules[0], result.molecules[2]
    trajectory, label = xtb_md._trajectory_frames, xtb_md._label

    current = {}

    def failing_trajectory(q, *args):
        current["q"] = q
        if q == bad_scf:
            from ase.calculators.calculator import CalculationFailed

            raise CalculationFailed("SCF not converged in 250 cycles")
        return trajectory(q, *args)

    def nan_label(frame, calc):
        energy, forces = label(frame, calc)
        return (math.nan if current["q"] == bad_energy else energy), forces

    monkeypatch.setattr(xtb_md, "_trajectory_frames", failing_trajectory)
    monkeypatch.setattr(xtb_md, "_label", nan_label)
    out = tmp_path / "partial.extxyz.gz"
    partial = xtb_md.sample_md(out, **TINY)
    assert set(partial.skipped) == {bad_scf, bad_energy}
    assert "SCF not converged" in partial.skipped[bad_scf] and "non-finite" in partial.skipped[bad_energy]
    assert partial.molecules == [result.molecules[1]] and partial.frames == 2
    frames = _read(out)
    assert {int(a.info["qm9_index"]) for a in frames} == {result.molecules[1]}
    sidecar = json.loads(partial.sidecar.read_text())
    assert set(sidecar["skipped"]) == {str(bad_scf), str(bad_energy)}
    # a second identical call reports the same from the sidecar
    assert xtb_md.sample_md(out, **TINY).skipped == partial.skipped


def test_linear_molecules_get_finite_velocities(qm9m):
    """ASE's ZeroRotation divides by a zero moment of inertia for acetylene (QM9 4)."""
    indices = xtb_md._qm9_indices(qm9m)
    z, pos = xtb_md._qm9_geometry(qm9m, int(np.searchsorted(indices, 4)))
    atoms = Atoms(numbers=z, positions=pos)
    thermalize(atoms, 500.0, np.random.default_rng([0, 4]))
    p = atoms.get_momenta()
    r = atoms.get_positions() - atoms.get_center_of_mass()
    assert np.isfinite(p).all() and np.abs(p).max() > 0
    np.testing.assert_allclose(p.sum(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(np.cross(r, p).sum(axis=0), 0, atol=1e-10)


def test_a_second_run_on_the_same_work_dir_is_refused(tmp_path):
    out = tmp_path / "locked.extxyz.gz"
    work = tmp_path / "locked.extxyz.gz.parts"
    work.mkdir()
    with open(work / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IrrepscopeError, match="another sampling"):
            xtb_md.sample_md(out, **TINY)


def _gap(qm9m):
    indices = xtb_md._qm9_indices(qm9m)
    return int(indices[np.flatnonzero(np.diff(indices) > 1)[0]] + 1)


@pytest.mark.parametrize(
    "name, change",
    [
        ("bad.xyz", {}),
        ("bad.extxyz.bz2", {}),
        ("ok.extxyz.gz", {"molecules": 0}),
        ("ok.extxyz.gz", {"molecules": -2}),
        ("ok.extxyz.gz", {"molecules": 10**7}),
        ("ok.extxyz.gz", {"molecules": True}),
        ("ok.extxyz.gz", {"molecules": 2, "qm9_index": 1}),
        ("ok.extxyz.gz", {"molecules": None, "qm9_index": 0}),
        ("ok.extxyz.gz", {"molecules": None, "qm9_index": "gap"}),
        ("ok.extxyz.gz", {"molecules": None, "qm9_index": "5"}),
        ("ok.extxyz.gz", {"frames": 0}),
        ("ok.extxyz.gz", {"frames": 2.5}),
        ("ok.extxyz.gz", {"every": 0}),
        ("ok.extxyz.gz", {"equilibration": -1}),
        ("ok.extxyz.gz", {"temperature": 0.0}),
        ("ok.extxyz.gz", {"temperature": -5.0}),
        ("ok.extxyz.gz", {"temperature": float("nan")}),
        ("ok.extxyz.gz", {"timestep_fs": 0.0}),
        ("ok.extxyz.gz", {"friction_per_fs": -0.1}),
        ("ok.extxyz.gz", {"seed": -1}),
        ("ok.extxyz.gz", {"workers": 0}),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, qm9m, name, change):
    kwargs = {**TINY, **change}
    if kwargs.get("qm9_index") == "gap":
        kwargs["qm9_index"] = _gap(qm9m)
    with pytest.raises(IrrepscopeError) as err:
        xtb_md.sample_md(tmp_path / name, **kwargs)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == [], "nothing is written for bad arguments"
