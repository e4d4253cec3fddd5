"""Mini-batches of structures as graphs in flat torch tensors.

Collating is pure index arithmetic on the concatenated arrays of
:class:`~irrepscope.data.structures.Structures` (no per-structure Python loop), so
batching costs far less than a model step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import torch

from irrepscope.data.graphs import bonds_to_directed, radius_edges
from irrepscope.data.structures import FORCES, Structures, refuse_periodic, segment_indices
from irrepscope.errors import IrrepscopeError

GRAPHS = ("bond", "radius")


@dataclass
class Batch:
    """A batch of structures: atoms of all structures concatenated, edges with global atom indices.

    Edges are directed and present in both directions; messages flow ``edge_src -> edge_dst``.
    ``y`` is the target per structure, in its unit (eV for energies); ``forces`` the
    per-atom forces (eV/Å) when asked for.
    """

    z: torch.Tensor  # long [N]
    pos: torch.Tensor  # float [N, 3], Å
    batch: torch.Tensor  # long [N], molecule of each atom within the batch
    edge_src: torch.Tensor  # long [E]
    edge_dst: torch.Tensor  # long [E]
    y: torch.Tensor | None  # float [G]
    num_graphs: int
    mol_index: torch.Tensor  # long [G], dataset index of each molecule
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # auxiliary targets, [G, k] each
    forces: torch.Tensor | None = None  # float [N, 3], eV/Å

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            z=self.z.to(device),
            pos=self.pos.to(device),
            batch=self.batch.to(device),
            edge_src=self.edge_src.to(device),
            edge_dst=self.edge_dst.to(device),
            y=None if self.y is None else self.y.to(device),
            mol_index=self.mol_index.to(device),
            aux={name: value.to(device) for name, value in self.aux.items()},
            forces=None if self.forces is None else self.forces.to(device),
        )


def collate(
    mols: Structures,
    indices: Sequence[int] | np.ndarray,
    target: str | None,
    graph: str = "bond",
    cutoff: float = 6.0,
    dtype: torch.dtype = torch.float32,
    auxiliary: Sequence[str] = (),
    forces: bool = False,
) -> Batch:
    """Build the ``Batch`` of structures ``indices`` of ``mols``.

    ``graph="bond"`` uses the perceived covalent bonds; ``graph="radius"`` connects all
    atom pairs of a structure closer than ``cutoff`` Å. ``target`` names a property of
    ``mols.properties`` (or None for no ``y``); ``auxiliary`` more of them, in ``aux``;
    ``forces`` adds the per-atom forces. Periodic structures are refused (no periodic
    images in these graphs).
    """
    if graph not in GRAPHS:
        raise IrrepscopeError(f"unknown graph {graph!r}; choose one of {GRAPHS}")
    for name in [target, *auxiliary] if target is not None else auxiliary:
        if name not in mols.properties:
            raise IrrepscopeError(f"unknown target {name!r}; available: {sorted(mols.properties)}")
    if forces and FORCES not in mols.atom_properties:
        raise IrrepscopeError("these structures carry no forces")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) == 0:
        raise IrrepscopeError("cannot collate an empty batch")
    if idx.min() < 0 or idx.max() >= len(mols):
        raise IrrepscopeError(f"structure index out of range [0, {len(mols)})")
    refuse_periodic(mols, idx)
    g = len(idx)
    atoms, atom_counts = segment_indices(mols.atom_ptr, idx)
    batch = np.repeat(np.arange(g, dtype=np.int64), atom_counts)
    pos64 = torch.from_numpy(mols.positions[atoms])
    batch_t = torch.from_numpy(batch)
    if graph == "bond":
        all_bonds, bond_ptr = mols.bond_graph()
        bond_rows, bond_counts = segment_indices(bond_ptr, idx)
        first_atom = np.cumsum(atom_counts) - atom_counts  # batch-global index of each structure's atom 0
        bonds = all_bonds[bond_rows] + np.repeat(first_atom, bond_counts)[:, None]
        src, dst = (torch.from_numpy(e) for e in bonds_to_directed(bonds))
    else:
        # On float64 positions, so that the edge set does not depend on ``dtype``.
        src, dst = radius_edges(pos64, batch_t, cutoff)
    y = None if target is None else torch.from_numpy(mols.properties[target][idx]).to(dtype)
    return Batch(
        z=torch.from_numpy(mols.atomic_numbers[atoms]),
        pos=pos64.to(dtype),
        batch=batch_t,
        edge_src=src,
        edge_dst=dst,
        y=y,
        num_graphs=g,
        mol_index=torch.from_numpy(idx.copy()),
        aux={name: torch.from_numpy(mols.properties[name][idx]).to(dtype) for name in auxiliary},
        forces=torch.from_numpy(mols.atom_properties[FORCES][atoms]).to(dtype) if forces else None,
    )


def iterate_batches(
    mols: Structures,
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int | np.random.Generator | None = None,
    target: str | None,
    graph: str = "bond",
    cutoff: float = 6.0,
    dtype: torch.dtype = torch.float32,
    auxiliary: Sequence[str] = (),
    forces: bool = False,
) -> Iterator[Batch]:
    """Yield batches of ``batch_size`` structures (the last one may be smaller) covering ``indices`` once.

    With ``shuffle``, the order is a permutation drawn from ``seed`` (an int, or a
    Generator whose state advances, so that successive epochs differ).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise IrrepscopeError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = np.asarray(indices, dtype=np.int64).reshape(-1)
    if shuffle:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        order = rng.permutation(order)
    for start in range(0, len(order), batch_size):
        yield collate(mols, order[start : start + batch_size], target, graph, cutoff, dtype, auxiliary, forces)
