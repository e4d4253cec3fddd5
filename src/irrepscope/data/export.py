"""Structures written as extended XYZ, so that other codes (NequIP, MACE, ...) train on exactly our structures.

Every frame holds the atoms and positions (Å), ``energy`` (the target in its unit; ASE
reads it as the frame's energy, which NequIP maps to ``total_energy``), the per-atom
``forces`` (eV/Å) where the structures carry them, ``qm9_index`` where known (so the
split can be checked) and ``index``: the structure's position in the run's data. The
energy and forces are also written as ``REF_energy`` and ``REF_forces``, the keys
``mace_run_train`` reads by default (MACE refuses to trust ASE's ``energy`` key, which an
attached calculator can overwrite).

An export also writes ``mace_E0s.json`` (MACE's ``--E0s``): the per-element energies of
the composition fit on the training split (:mod:`irrepscope.data.composition`, the
baseline that every error is reported beside), for an extensive target. They are fitted
shifts, not isolated-atom energies; for QM9's atomization energies the isolated atoms are
zero by definition, and MACE's ``--E0s average`` is the same least-squares fit.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from irrepscope.atomic import atomic_write, atomic_write_json, recover_directory, replace_directory, staging_directory
from irrepscope.data.composition import ELEMENTS, fit_composition, is_extensive
from irrepscope.data.multipoles import is_equivariant
from irrepscope.data.split import SPLIT_NAMES
from irrepscope.data.structures import FORCES, QM9_INDEX, Structures
from irrepscope.errors import IrrepscopeError
from irrepscope.locks import lock_output

MACE_ENERGY_KEY, MACE_FORCES_KEY = "REF_energy", "REF_forces"  # mace_run_train's default keys
MACE_E0S = "mace_E0s.json"


def to_atoms(structures: Structures, i: int, target: str | None = None) -> Atoms:
    """Structure ``i`` as ASE Atoms: ``target`` as its energy and the forces (a SinglePointCalculator), index, qm9_index."""
    z, pos = structures.structure(i)
    atoms = Atoms(numbers=z, positions=pos)
    if structures.cell is not None and structures.pbc is not None:
        atoms.set_cell(structures.cell[i])
        atoms.set_pbc(structures.pbc[i])
    results = {}
    if target is not None:
        results["energy"] = atoms.info[MACE_ENERGY_KEY] = float(structures.properties[target][i])
    if FORCES in structures.atom_properties:
        results["forces"] = np.array(structures.atom_property(FORCES, i))
        atoms.arrays[MACE_FORCES_KEY] = results["forces"].copy()
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["index"] = int(i)
    if QM9_INDEX in structures.properties and structures.properties[QM9_INDEX][i] >= 0:
        atoms.info[QM9_INDEX] = int(structures.properties[QM9_INDEX][i])
    return atoms


def write_extxyz(structures: Structures, indices: np.ndarray, path: str | Path, target: str) -> Path:
    """Write ``structures[indices]`` with ``target`` as each frame's ``energy`` (and forces where present) to ``path``, atomically."""
    if is_equivariant(target):
        raise IrrepscopeError(f"export writes a scalar energy per frame; {target} is a vector/tensor target")
    import ase.io

    frames = [to_atoms(structures, int(i), target) for i in np.asarray(indices, dtype=np.int64)]

    def write(f) -> None:
        text = io.StringIO()
        ase.io.write(text, frames, format="extxyz")
        f.write(text.getvalue().encode("utf-8"))

    return atomic_write(path, write)


EXPORT_FILES = tuple(f"{name}.extxyz" for name in SPLIT_NAMES) + ("export.json", MACE_E0S)


def mace_e0s(structures: Structures, split: dict[str, np.ndarray], target: str) -> tuple[dict[str, float] | None, str]:
    """MACE's ``--E0s`` for ``target`` (atomic number as text -> value) and how they were made, or None and why not.

    One value per element of the training and validation structures, no more: ``mace_run_train``
    builds its element table from those two files and wants exactly one E0 per entry.
    """
    if not is_extensive(target):
        return None, f"{target} is not extensive: no per-element energies (give MACE --E0s yourself)"
    present = set(np.unique(structures.subset(np.concatenate([split["train"], split["val"]])).atomic_numbers).tolist())
    if not present <= set(ELEMENTS):
        return None, f"elements {sorted(present - set(ELEMENTS))} are outside the composition fit's H, C, N, O, F"
    fit = fit_composition(structures, split["train"], target)
    rule = f"least squares of {target} on element counts over the {fit.n_fit} training structures (the composition baseline)"
    return {str(z): fit.per_element[z] for z in sorted(present)}, rule


def export_split(
    structures: Structures,
    split: dict[str, np.ndarray],
    out_dir: str | Path,
    target: str,
    *,
    force: bool = False,
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """``OUT/train.extxyz``, ``val.extxyz``, ``test.extxyz``, ``export.json`` (what was exported) and, for an
    extensive target, ``mace_E0s.json`` (:func:`mace_e0s`), as one set.

    The set is staged beside ``OUT`` and swapped onto it in one step, under ``OUT``'s lock:
    a kill leaves the previous export whole (never a new train set beside an old test set).
    A non-empty ``OUT`` is refused unless ``force``, and even then when it holds files
    that an export does not write.
    """
    out = Path(out_dir)
    with lock_output(out, "irrepscope export"):
        recover_directory(out)
        if out.exists() and not out.is_dir():
            raise IrrepscopeError(f"--out {out} is a file, not a folder")
        present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        foreign = [name for name in present if name not in EXPORT_FILES]
        if foreign:
            raise IrrepscopeError(f"--out {out} holds files an export does not write ({', '.join(foreign[:3])}); choose an empty folder")
        if present and not force:
            raise IrrepscopeError(f"--out {out} already holds an export; add --force to replace it")
        staged = staging_directory(out)
        try:
            paths = {name: write_extxyz(structures, split[name], staged / f"{name}.extxyz", target) for name in SPLIT_NAMES}
            counts = {name: int(len(split[name])) for name in SPLIT_NAMES}
            e0s, rule = mace_e0s(structures, split, target)
            if e0s is not None:
                atomic_write_json(staged / MACE_E0S, e0s)
            mace = {"energy_key": MACE_ENERGY_KEY, "forces_key": MACE_FORCES_KEY, "E0s": MACE_E0S if e0s else None, "E0s_rule": rule}
            atomic_write_json(staged / "export.json", {"target": target, "structures": counts, **(meta or {}), "mace": mace})
            replace_directory(staged, out)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return {name: out / path.name for name, path in paths.items()}
