"""Reading molecules to predict on from structure files (XYZ, extended XYZ, anything ASE reads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

from irrepscope.errors import IrrepscopeError


def read_structures(path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every frame of ``path`` as ``(z int64 [n], pos float64 [n, 3] in Å)``."""
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
    structures = []
    for k, atoms in enumerate(frames):
        if len(atoms) == 0:
            raise IrrepscopeError(f"{path}: frame {k} has no atoms")
        z, pos = atoms.get_atomic_numbers().astype(np.int64), atoms.get_positions().astype(np.float64)
        check_geometry(pos, f"{path}, molecule {k}")
        structures.append((z, pos))
    return structures


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
