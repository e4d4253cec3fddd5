"""QM9 molecules written as extended XYZ, so that other codes (NequIP, MACE, ...) train on exactly our molecules.

Every frame holds the atoms and positions (Å), ``energy`` (the target in its unit; ASE
reads it as the frame's energy, which NequIP maps to ``total_energy``) and ``qm9_index``
(the molecule's index in irrepscope's QM9, so the split can be checked).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from ase import Atoms

from irrepscope.atomic import atomic_write
from irrepscope.data.multipoles import is_equivariant
from irrepscope.data.qm9 import Molecules
from irrepscope.data.split import SPLIT_NAMES
from irrepscope.errors import IrrepscopeError


def write_extxyz(mols: Molecules, indices: np.ndarray, path: str | Path, target: str) -> Path:
    """Write ``mols[indices]`` with ``target`` as each frame's ``energy`` to ``path`` (atomically)."""
    if is_equivariant(target):
        raise IrrepscopeError(f"export writes a scalar energy per frame; {target} is a vector/tensor target")
    import ase.io

    frames = []
    for i in np.asarray(indices, dtype=np.int64):
        z, pos = mols.molecule(int(i))
        atoms = Atoms(numbers=z, positions=pos)
        atoms.info["energy"] = float(mols.properties[target][i])
        atoms.info["qm9_index"] = int(i)
        frames.append(atoms)

    def write(f) -> None:
        text = io.StringIO()
        ase.io.write(text, frames, format="extxyz")
        f.write(text.getvalue().encode("utf-8"))

    return atomic_write(path, write)


def export_split(mols: Molecules, split: dict[str, np.ndarray], out_dir: str | Path, target: str) -> dict[str, Path]:
    """``OUT/train.extxyz``, ``val.extxyz`` and ``test.extxyz`` of a split."""
    out = Path(out_dir)
    return {name: write_extxyz(mols, split[name], out / f"{name}.extxyz", target) for name in SPLIT_NAMES}
