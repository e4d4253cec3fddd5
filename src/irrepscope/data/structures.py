"""One type for every set of atomistic structures: :class:`Structures`.

Every stage (model, training, analysis, export, predict) takes it, whatever the source:
QM9 (:func:`irrepscope.data.qm9.load_qm9`), extended XYZ files read with ASE
(:func:`irrepscope.data.xyz.read_extxyz`), or labelled molecular dynamics
(:mod:`irrepscope.data.xtb_md`). As in NequIP's ``AtomicDataDict`` and SchNetPack's
``ASEAtomsData``, the type knows only atoms, positions, an optional cell and named
properties; what one source has (QM9's SMILES, Mulliken charges, QM9 index) is a named
property like any other, and code that does not need it never sees it.

Layout: the atoms of all structures concatenated (structure m owns atoms
``atom_ptr[m]:atom_ptr[m+1]``), so that batching is index arithmetic, not a Python loop.

Well-known property names:

* :data:`ENERGY` (``properties``, eV): the total energy of a structure file's frames;
* :data:`FORCES` (``atom_properties``, [A, 3], eV/Å);
* :data:`CLASS` (``properties``, strings): what kind of structure it is, for per-class views;
* ``qm9_index``, ``smiles``, ``polarizability_tensor`` (per structure) and ``mulliken``
  (per atom, e) where the source is QM9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from irrepscope.errors import IrrepscopeError

ENERGY = "energy"  # per-structure energy in eV: ASE's and NequIP's name
FORCES = "forces"  # per-atom forces in eV/Å: ASE's and NequIP's name
QM9_INDEX = "qm9_index"  # a structure's molecule in QM9 (-1: none)
SMILES = "smiles"
CLASS = "class"  # a structure's class for per-class summaries (e.g. "molecule", "ionic crystal"): a string
MULLIKEN = "mulliken"


def segment_indices(ptr: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the segments ``ptr[i]:ptr[i+1]`` for i in ``idx``, concatenated, and their lengths."""
    starts = ptr[idx]
    counts = ptr[idx + 1] - starts
    offsets = np.cumsum(counts) - counts  # where each segment starts in the output
    flat = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - offsets, counts)
    return flat, counts


def pointer(counts: np.ndarray) -> np.ndarray:
    """``[0, c0, c0 + c1, ...]``: the int64 pointer of segments of these lengths."""
    ptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


@dataclass
class Structures:
    """A set of structures as concatenated arrays (see the module docstring).

    ``properties`` map names to per-structure arrays ``[M, ...]`` (numbers, or strings
    such as SMILES); ``atom_properties`` to per-atom arrays ``[A, ...]``. ``cell`` [M, 3, 3]
    (Å, rows are lattice vectors) and ``pbc`` [M, 3] are None for molecules in vacuum.
    ``bonds`` (structure-local atom pairs i < j) and ``bond_ptr`` are perceived from the
    geometry on first use (:meth:`bond_graph`) unless the source gives them (QM9's cache).
    """

    atomic_numbers: np.ndarray  # int64 [A]
    positions: np.ndarray  # float64 [A, 3], Å
    atom_ptr: np.ndarray  # int64 [M+1]
    properties: dict[str, np.ndarray] = field(default_factory=dict)
    atom_properties: dict[str, np.ndarray] = field(default_factory=dict)
    cell: np.ndarray | None = None  # float64 [M, 3, 3]
    pbc: np.ndarray | None = None  # bool [M, 3]
    bonds: np.ndarray | None = None  # int64 [B, 2]
    bond_ptr: np.ndarray | None = None  # int64 [M+1]

    def __len__(self) -> int:
        return len(self.atom_ptr) - 1

    def num_atoms(self, i: int | None = None) -> int | np.ndarray:
        """Number of atoms of structure ``i``, or of every structure [M] when ``i`` is None."""
        if i is None:
            return np.diff(self.atom_ptr)
        return int(self.atom_ptr[i + 1] - self.atom_ptr[i])

    def structure(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Atomic numbers [n] and positions [n, 3] (Å) of structure ``i`` (views)."""
        a, b = self.atom_ptr[i], self.atom_ptr[i + 1]
        return self.atomic_numbers[a:b], self.positions[a:b]

    def atom_property(self, name: str, i: int) -> np.ndarray:
        """The per-atom property ``name`` of structure ``i`` (a view)."""
        return self.atom_properties[name][self.atom_ptr[i] : self.atom_ptr[i + 1]]

    def atom_values(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The per-atom property ``name`` of the atoms of ``structures[indices]``, concatenated in that order (batch order)."""
        atoms, _ = segment_indices(self.atom_ptr, np.asarray(indices, dtype=np.int64).reshape(-1))
        return self.atom_properties[name][atoms]

    @property
    def periodic(self) -> np.ndarray:
        """[M] bool: structures with at least one periodic direction."""
        if self.pbc is None:
            return np.zeros(len(self), dtype=bool)
        return np.asarray(self.pbc, dtype=bool).any(axis=1)

    def bond_graph(self) -> tuple[np.ndarray, np.ndarray]:
        """``(bonds, bond_ptr)``: covalent bonds perceived from the geometry (see :mod:`~irrepscope.data.graphs`), cached."""
        if self.bonds is None or self.bond_ptr is None:
            from irrepscope.data.graphs import covalent_bonds_many

            self.bonds, self.bond_ptr = covalent_bonds_many(self.atomic_numbers, self.positions, self.atom_ptr)
        return self.bonds, self.bond_ptr

    def structure_bonds(self, i: int) -> np.ndarray:
        """Structure-local bonds [B, 2] of structure ``i`` (a view)."""
        bonds, ptr = self.bond_graph()
        return bonds[ptr[i] : ptr[i + 1]]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Structures:
        """A new :class:`Structures` holding the structures ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IrrepscopeError(f"structure index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        atoms, atom_counts = segment_indices(self.atom_ptr, idx)
        bonds = bond_ptr = None
        if self.bonds is not None and self.bond_ptr is not None:
            rows, bond_counts = segment_indices(self.bond_ptr, idx)
            bonds, bond_ptr = self.bonds[rows], pointer(bond_counts)
        return Structures(
            atomic_numbers=self.atomic_numbers[atoms],
            positions=self.positions[atoms],
            atom_ptr=pointer(atom_counts),
            properties={k: v[idx] for k, v in self.properties.items()},
            atom_properties={k: v[atoms] for k, v in self.atom_properties.items()},
            cell=None if self.cell is None else self.cell[idx],
            pbc=None if self.pbc is None else self.pbc[idx],
            bonds=bonds,
            bond_ptr=bond_ptr,
        )

    @classmethod
    def from_arrays(
        cls,
        structures: Sequence[tuple[np.ndarray, np.ndarray]],
        properties: dict[str, np.ndarray] | None = None,
        atom_properties: dict[str, np.ndarray] | None = None,
        cell: np.ndarray | None = None,
        pbc: np.ndarray | None = None,
    ) -> Structures:
        """Structures from ``(z, pos)`` pairs (e.g. read from a file); per-atom properties are concatenated arrays."""
        if len(structures) == 0:
            raise IrrepscopeError("no structures given")
        zs, ps = [], []
        for k, (z, pos) in enumerate(structures):
            z = np.asarray(z, dtype=np.int64).reshape(-1)
            pos = np.asarray(pos, dtype=np.float64)
            if len(z) == 0 or pos.shape != (len(z), 3):
                raise IrrepscopeError(
                    f"structure {k}: need n > 0 atomic numbers and [n, 3] positions, got {len(z)} and {pos.shape}"
                )
            zs.append(z)
            ps.append(pos)
        out = cls(
            atomic_numbers=np.concatenate(zs),
            positions=np.concatenate(ps),
            atom_ptr=pointer(np.array([len(z) for z in zs])),
            properties={k: _array(v) for k, v in (properties or {}).items()},
            atom_properties={k: _array(v) for k, v in (atom_properties or {}).items()},
            cell=None if cell is None else np.asarray(cell, dtype=np.float64),
            pbc=None if pbc is None else np.asarray(pbc, dtype=bool),
        )
        out.validate()
        return out

    def validate(self) -> None:
        """Check that arrays, pointers and property shapes agree; raise IrrepscopeError otherwise."""
        m, a = len(self), len(self.atomic_numbers)
        ok = (
            self.atom_ptr.ndim == 1
            and m >= 0
            and self.atom_ptr[0] == 0
            and self.atom_ptr[-1] == a
            and np.all(np.diff(self.atom_ptr) > 0)
            and self.positions.shape == (a, 3)
            and all(len(v) == m for v in self.properties.values())
            and all(len(v) == a for v in self.atom_properties.values())
            and (self.cell is None or self.cell.shape == (m, 3, 3))
            and (self.pbc is None or self.pbc.shape == (m, 3))
        )
        if ok and self.bonds is not None:
            ok = (
                self.bond_ptr is not None
                and self.bond_ptr.shape == (m + 1,)
                and self.bond_ptr[0] == 0
                and self.bond_ptr[-1] == len(self.bonds)
                and np.all(np.diff(self.bond_ptr) >= 0)
                and self.bonds.shape == (len(self.bonds), 2)
            )
        if not ok:
            raise IrrepscopeError("inconsistent structure arrays (corrupt data or cache)")


def _array(values) -> np.ndarray:
    """A property as a numpy array; strings (e.g. SMILES) as an object array, so that indexing keeps them whole."""
    array = np.asarray(values)
    return array.astype(object) if array.dtype.kind in "US" else array


def refuse_periodic(structures: Structures, indices: np.ndarray | None = None, who: str = "irrepscope's own model") -> None:
    """One-line error when any of ``structures[indices]`` has periodic boundaries, which ``who`` does not support."""
    periodic = structures.periodic if indices is None else structures.periodic[np.asarray(indices, dtype=np.int64)]
    if periodic.any():
        first = int(np.flatnonzero(periodic)[0])
        where = first if indices is None else int(np.asarray(indices)[first])
        raise IrrepscopeError(
            f"structure {where} has periodic boundaries (a cell with pbc), which {who} does not support yet; "
            "give molecules in vacuum"
        )
