"""Reading molecules to predict on from structure files (XYZ, extended XYZ, anything ASE reads)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from irrepscope.data.qm9 import Molecules
from irrepscope.errors import IrrepscopeError, shorten


def _read_frames(path: str | os.PathLike) -> list:
    """Every frame of ``path`` as ASE Atoms, with one-line errors for what ASE cannot read."""
    import ase.io  # heavy import, only needed here

    path = Path(path)
    if not path.is_file():
        raise IrrepscopeError(f"structure file {path} not found")
    try:
        frames = ase.io.read(path, index=":")
    except KeyError as err:
        # ASE's XYZ reader raises KeyError(symbol) for an element symbol it does not know.
        raise IrrepscopeError(f"{path}: unknown element symbol {err.args[0]!r}") from None
    except Exception as err:  # ASE raises many types (ValueError, XYZError, UnknownFileTypeError, ...)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IrrepscopeError(f"cannot read structure file {path}: {message}") from None
    if not frames:
        raise IrrepscopeError(f"structure file {path} holds no molecules")
    for k, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise IrrepscopeError(f"{path}: frame {k} has no atoms")
        check_geometry(atoms.get_positions(), f"{path}, molecule {k}")
    return frames


def read_structures(path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every frame of ``path`` as ``(z int64 [n], pos float64 [n, 3] in Å)``."""
    return [(a.get_atomic_numbers().astype(np.int64), a.get_positions().astype(np.float64)) for a in _read_frames(path)]


# The property under which read_labelled stores a file's energies (eV, NequIP's convention).
FILE_ENERGY = "energy"


def _energy(atoms: Any, key: str, where: str) -> float:
    if key in atoms.info:
        value = atoms.info[key]
    elif atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        value = atoms.calc.results[key]  # extxyz's `energy=` becomes the frame's calculator energy
    else:
        raise IrrepscopeError(f"{where} has no {key!r} (give the file's energy key with --energy-key)")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise IrrepscopeError(f"{where}: {key!r} is not a number: {shorten(value)}") from None
    if not np.isfinite(value):
        raise IrrepscopeError(f"{where}: {key!r} is {value}")
    return value


def read_labelled(paths: Sequence[str | os.PathLike], energy_key: str = "energy") -> tuple[Molecules, list[np.ndarray]]:
    """The frames of every file in ``paths`` as one :class:`Molecules` (energies under :data:`FILE_ENERGY`), and
    each file's molecule indices in it.

    Geometry files carry no bonds, SMILES or charges: those fields are empty or zero. A
    frame's ``qm9_index`` (written by ``irrepscope export``) is kept, else -1.
    """
    z_all, pos_all, ptr, energies, qm9, owners = [], [], [0], [], [], []
    for f, path in enumerate(paths):
        for k, atoms in enumerate(_read_frames(path)):
            energies.append(_energy(atoms, energy_key, f"{path}, molecule {k}"))
            z_all.append(atoms.get_atomic_numbers().astype(np.int64))
            pos_all.append(atoms.get_positions().astype(np.float64))
            ptr.append(ptr[-1] + len(atoms))
            try:
                qm9.append(int(atoms.info.get("qm9_index", -1)))
            except (TypeError, ValueError):
                raise IrrepscopeError(f"{path}, molecule {k}: qm9_index is not an integer") from None
            owners.append(f)
    m, n_atoms = len(energies), ptr[-1]
    mols = Molecules(
        atomic_numbers=np.concatenate(z_all),
        positions=np.concatenate(pos_all),
        atom_ptr=np.asarray(ptr, dtype=np.int64),
        bonds=np.zeros((0, 2), dtype=np.int64),
        bond_ptr=np.zeros(m + 1, dtype=np.int64),
        mulliken=np.zeros(n_atoms),
        qm9_index=np.asarray(qm9, dtype=np.int64),
        smiles=[""] * m,
        properties={FILE_ENERGY: np.asarray(energies, dtype=np.float64)},
        polarizability_tensor=np.zeros((m, 6)),
    )
    owner = np.asarray(owners)
    return mols, [np.flatnonzero(owner == f) for f in range(len(paths))]


# Closer than this no two atoms of a molecule are (the shortest bond, H-H, is 0.74 Å); at
# 0 Å the radial basis is 0/0 and the edge direction undefined.
MIN_DISTANCE = 0.1  # Å


def check_geometry(pos: np.ndarray, where: str) -> None:
    """Refuse non-finite coordinates and atoms on top of each other."""
    bad = np.flatnonzero(~np.isfinite(pos).all(axis=1))
    if len(bad):
        raise IrrepscopeError(f"{where}: atom {bad[0]} has a non-finite coordinate {pos[bad[0]].tolist()}")
    if len(pos) > 1:
        from scipy.spatial import cKDTree

        dist, nearest = cKDTree(pos).query(pos, k=2)  # column 0 is the atom itself
        i = int(np.argmin(dist[:, 1]))
        if dist[i, 1] < MIN_DISTANCE:
            j = int(nearest[i, 1])
            raise IrrepscopeError(
                f"{where}: atoms {min(i, j)} and {max(i, j)} are {dist[i, 1]:.3g} Å apart (at most one atom per place)"
            )


def check_elements(z: np.ndarray, allowed: set[int]) -> None:
    """Raise IrrepscopeError naming the first element of ``z`` that is not in ``allowed``."""
    for value in np.unique(np.asarray(z, dtype=np.int64)):
        if int(value) not in allowed:
            names = ", ".join(_symbol(a) for a in sorted(allowed))
            raise IrrepscopeError(f"element {_symbol(int(value))} (Z={value}) is not supported; allowed: {names}")


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"
