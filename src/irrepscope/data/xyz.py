"""Structures from files (extended XYZ, XYZ, anything ASE reads), with energies, forces and cells."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from irrepscope.data.structures import CLASS, ENERGY, FORCES, QM9_INDEX, Structures
from irrepscope.errors import IrrepscopeError, shorten


# ASE's extxyz reader seeks back and forth in the file, and every backward seek in a gzip stream
# restarts the decompression: reading 4,000 frames of a .extxyz.gz took minutes. Compressed XYZ
# files are decompressed into memory first (a few MB), which makes the same read take seconds.
_COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def _ase_read_all(path: Path) -> list:
    import importlib
    import io

    import ase.io

    inner = Path(path.stem)  # "frames.extxyz" of "frames.extxyz.gz"
    if path.suffix in _COMPRESSED and inner.suffix in (".extxyz", ".xyz"):
        opener = importlib.import_module(_COMPRESSED[path.suffix]).open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        return ase.io.read(io.StringIO(text), index=":", format="extxyz")
    return ase.io.read(path, index=":")


def _read_frames(path: str | os.PathLike) -> list:
    """Every frame of ``path`` as ASE Atoms, with one-line errors for what ASE cannot read."""
    path = Path(path)
    if not path.is_file():
        raise IrrepscopeError(f"structure file {path} not found")
    try:
        frames = _ase_read_all(path)
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


def read_structures(path: str | os.PathLike) -> Structures:
    """Every frame of ``path`` as :class:`Structures` (positions in Å, the cell where a frame is periodic), no labels."""
    return read_extxyz([path], energy_key=None, forces_key=None)[0]


def _label(atoms: Any, key: str, table: dict, where: str, what: str) -> Any:
    """A frame's ``key`` from ``table`` (``atoms.info`` or ``atoms.arrays``) or its calculator's results."""
    if key in table:
        return table[key]
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return atoms.calc.results[key]  # extxyz's `energy=` and `forces` column become the frame's calculator results
    option = what.split()[-1]
    raise IrrepscopeError(f"{where} has no {what} {key!r} (give the file's key: data.{option}_key or --{option}-key)")


def _energy(atoms: Any, key: str, where: str) -> float:
    value = _label(atoms, key, atoms.info, where, "energy")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise IrrepscopeError(f"{where}: {key!r} is not a number: {shorten(value)}") from None
    if not np.isfinite(value):
        raise IrrepscopeError(f"{where}: {key!r} is {value}")
    bound = energy_bound(atoms.get_atomic_numbers())
    if abs(value) > bound:
        raise IrrepscopeError(
            f"{where}: {key!r} is {value:.4g} eV, beyond {bound:.3g} eV (ten times the total energy of its atoms): "
            "a wrong label or unit"
        )
    return value


def energy_bound(z: np.ndarray) -> float:
    """The largest |energy| (eV) a structure of these atoms may be labelled with: ten times their total energy.

    An atom's total electronic energy is about the Thomas-Fermi 20.8 Z^(7/3) eV (H: 21 vs 13.6
    exact, C: 1,360 vs 1,030, U: 8.0e5 vs 7.6e5), plus 100 eV per atom of slack for
    light atoms; energies relative to references (atomization, formation) are far smaller.
    """
    z = np.asarray(z, dtype=np.float64)
    return float(np.sum(10 * 20.8 * z ** (7 / 3) + 100))


def _forces(atoms: Any, key: str, where: str) -> np.ndarray:
    value = _label(atoms, key, atoms.arrays, where, "per-atom forces")
    try:
        value = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise IrrepscopeError(f"{where}: {key!r} is not numeric") from None
    if value.shape != (len(atoms), 3):
        raise IrrepscopeError(f"{where}: {key!r} has shape {value.shape}, expected ({len(atoms)}, 3)")
    bad = np.flatnonzero(~np.isfinite(value).all(axis=1))
    if len(bad):
        raise IrrepscopeError(f"{where}: {key!r} of atom {bad[0]} is not finite: {value[bad[0]].tolist()}")
    big = np.flatnonzero(np.abs(value).max(axis=1) > MAX_FORCE)
    if len(big):
        raise IrrepscopeError(
            f"{where}: {key!r} of atom {big[0]} is {value[big[0]].tolist()}, beyond {MAX_FORCE:.0e} eV/Å: a wrong label or unit"
        )
    return value


def _has_forces(atoms: Any, key: str) -> bool:
    return key in atoms.arrays or (atoms.calc is not None and key in getattr(atoms.calc, "results", {}))


def _cell(frames: list, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Cells [M, 3, 3] and periodic flags [M, 3], or (None, None) when no frame is periodic."""
    pbc = np.array([a.get_pbc() for a in frames], dtype=bool)
    if not pbc.any():
        return None, None
    cell = np.array([a.get_cell().array for a in frames], dtype=np.float64)
    for k in np.flatnonzero(pbc.any(axis=1)):
        if abs(np.linalg.det(cell[k])) < 1e-9 and pbc[k].all():
            raise IrrepscopeError(f"{where}, frame {k}: periodic in every direction but its cell has no volume")
    return cell, pbc


def read_extxyz(
    paths: Sequence[str | os.PathLike],
    energy_key: str | None = ENERGY,
    forces_key: str | None = FORCES,
    require_forces: bool = False,
) -> tuple[Structures, list[np.ndarray]]:
    """The frames of every file in ``paths`` as one :class:`Structures`, and each file's structure indices in it.

    ``energy_key`` (eV, ASE's and NequIP's ``energy`` by default) is stored as
    :data:`~irrepscope.data.structures.ENERGY` and ``forces_key`` (eV/Å) as
    :data:`~irrepscope.data.structures.FORCES`; None reads no such label. The forces are
    read when every frame carries them; with ``require_forces`` a frame without them is an
    error. A frame's
    ``qm9_index`` (written by ``irrepscope export`` and ``irrepscope sample-xtb``) is kept,
    else -1; further numeric per-frame values that every frame carries (e.g.
    ``temperature_K``) become properties of the same name, and so does a string ``class`` (per-class
    summaries of a potential analysis; "" for a frame without one). Periodic frames keep their cell.
    """
    frames, owners = [], []
    for f, path in enumerate(paths):
        for k, atoms in enumerate(_read_frames(path)):
            frames.append((f"{path}, molecule {k}", atoms))
            owners.append(f)
    properties: dict[str, np.ndarray] = {}
    atom_properties: dict[str, np.ndarray] = {}
    if energy_key is not None:
        properties[ENERGY] = np.array([_energy(a, energy_key, w) for w, a in frames], dtype=np.float64)
    if forces_key is not None and (require_forces or all(_has_forces(a, forces_key) for _, a in frames)):
        atom_properties[FORCES] = np.concatenate([_forces(a, forces_key, w) for w, a in frames])
    qm9 = []
    for where, atoms in frames:
        try:
            qm9.append(int(atoms.info.get(QM9_INDEX, -1)))
        except (TypeError, ValueError):
            raise IrrepscopeError(f"{where}: qm9_index is not an integer") from None
    properties[QM9_INDEX] = np.asarray(qm9, dtype=np.int64)
    if any(isinstance(a.info.get(CLASS), str) for _, a in frames):  # e.g. "ionic crystal": per-class summaries
        properties[CLASS] = np.array([str(a.info.get(CLASS, "")) for _, a in frames], dtype=object)  # "": not given
    for key in _shared_numeric_info([a for _, a in frames]):
        if key not in properties and key not in (energy_key,):
            properties[key] = np.array([float(a.info[key]) for _, a in frames])
    cell, pbc = _cell([a for _, a in frames], str(paths[0]) if len(paths) == 1 else "structure files")
    structures = Structures.from_arrays(
        [(a.get_atomic_numbers(), a.get_positions()) for _, a in frames], properties, atom_properties, cell, pbc
    )
    owner = np.asarray(owners)
    return structures, [np.flatnonzero(owner == f) for f in range(len(paths))]


def _shared_numeric_info(frames: list) -> list[str]:
    """The ``atoms.info`` keys with a real number in every frame."""
    keys = set(frames[0].info)
    for atoms in frames[1:]:
        keys &= set(atoms.info)
    numeric = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)  # noqa: E731
    return sorted(k for k in keys if all(numeric(a.info[k]) for a in frames))


# Labels and coordinates beyond these are refused (README "Integrity"): no physical structure has
# them, and in float32, where the models compute, they overflow or lose all precision (a
# coordinate of 1e4 Å keeps only ~1e-3 Å); one such label would dominate every mean error.
MAX_COORDINATE = 1e4  # Å
MAX_FORCE = 1e4  # eV/Å per component: molecular dynamics sees at most tens

# Closer than this no two atoms of a molecule are (the shortest bond, H-H, is 0.74 Å); at
# 0 Å the radial basis is 0/0 and the edge direction undefined.
MIN_DISTANCE = 0.1  # Å


def check_geometry(pos: np.ndarray, where: str) -> None:
    """Refuse non-finite or far-off coordinates (beyond :data:`MAX_COORDINATE`) and atoms on top of each other."""
    bad = np.flatnonzero(~np.isfinite(pos).all(axis=1))
    if len(bad):
        raise IrrepscopeError(f"{where}: atom {bad[0]} has a non-finite coordinate {pos[bad[0]].tolist()}")
    far = np.flatnonzero(np.abs(pos).max(axis=1) > MAX_COORDINATE)
    if len(far):
        raise IrrepscopeError(
            f"{where}: atom {far[0]} is at {pos[far[0]].tolist()}, beyond {MAX_COORDINATE:.0e} Å from the origin "
            "(float32, in which the model computes, keeps no precision there)"
        )
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
