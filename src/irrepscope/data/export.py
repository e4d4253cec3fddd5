"""Structures written as extended XYZ, so that other codes (NequIP, MACE, ...) train on exactly our structures.

Every frame holds the atoms and positions (Å), ``energy`` (the target in its unit; ASE
reads it as the frame's energy, which NequIP maps to ``total_energy``), the per-atom
``forces`` (eV/Å) where the structures carry them, ``qm9_index`` where known (so the
split can be checked) and ``index``: the structure's position in the run's data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from irrepscope.atomic import atomic_write
from irrepscope.data.multipoles import is_equivariant
from irrepscope.data.split import SPLIT_NAMES
from irrepscope.data.structures import FORCES, QM9_INDEX, Structures
from irrepscope.errors import IrrepscopeError


def to_atoms(structures: Structures, i: int, target: str | None = None) -> Atoms:
    """Structure ``i`` as ASE Atoms: ``target`` as its energy and the forces (a SinglePointCalculator), index, qm9_index."""
    z, pos = structures.structure(i)
    atoms = Atoms(numbers=z, positions=pos)
    if structures.cell is not None and structures.pbc is not None:
        atoms.set_cell(structures.cell[i])
        atoms.set_pbc(structures.pbc[i])
    results = {}
    if target is not None:
        results["energy"] = float(structures.properties[target][i])
    if FORCES in structures.atom_properties:
        results["forces"] = np.array(structures.atom_property(FORCES, i))
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


def export_split(structures: Structures, split: dict[str, np.ndarray], out_dir: str | Path, target: str) -> dict[str, Path]:
    """``OUT/train.extxyz``, ``val.extxyz`` and ``test.extxyz`` of a split."""
    out = Path(out_dir)
    return {name: write_extxyz(structures, split[name], out / f"{name}.extxyz", target) for name in SPLIT_NAMES}
