"""What the order-usage analysis needs from a trained model, said once: :class:`AnalysedModel`.

A model family implements it: irrepscope's own model is
:class:`irrepscope.analysis.own_model.OwnModel`. The analysis (``features``, ``usage``,
``runner``) talks to nothing else, so it works for any equivariant network whose
interaction blocks put out e3nn irreps:

* the blocks in order, with the irreps of each block's output node features;
* the molecules as batches the model evaluates (:meth:`AnalysedModel.batches`);
* a forward pass that returns one prediction per molecule and lets a hook keep or
  replace each block's output (:meth:`AnalysedModel.forward`): that one hook serves
  gradients, embeddings and ablations alike.

Exact shortcuts that only some families allow are methods with a generic default:
:meth:`AnalysedModel.all_blocks_ablation` re-runs the model once per order, a family
may compute it faster; ``linear_in_features`` says that the prediction is affine in
every block's output, so that zeroing an order after one block changes it by exactly
``-<dpred/dx, x>`` (one backward pass for every (block, order) at once).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from e3nn import o3

from irrepscope.data.structures import Structures
from irrepscope.orders import order_slices

NodeHook = Callable[[int, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def hooked_outputs(
    blocks: Sequence[torch.nn.Module], hook: NodeHook | None, key: str | None = None, copy: bool = False
) -> Iterator[None]:
    """While the context runs, ``hook(i, x)`` on block ``i``'s node features ``x`` replaces them.

    ``key=None``: the block returns the node features themselves (MACE's products). Otherwise
    it returns a mapping of named tensors (NequIP's dict, SevenNet's data object) holding them
    under ``key``: ``copy`` puts a changed entry into a copy of the mapping (one the caller
    may still hold), else into the mapping itself. Without a hook nothing is registered.
    """
    handles = []
    if hook is not None:
        for i, block in enumerate(blocks):

            def replace(module, inputs, out, i=i):
                x = out if key is None else out[key]
                y = hook(i, x)
                if y is x:
                    return None  # a forward hook returning None keeps the block's output
                if key is None:
                    return y
                out = dict(out) if copy else out
                out[key] = y
                return out

            handles.append(block.register_forward_hook(replace))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def known_atoms(mols: Structures, i: int, elements: Collection[int], model_name: str):
    """Structure ``i`` as ASE Atoms (cell and pbc where it is periodic) for another code's graph builder, after
    refusing by name any element that ``model_name`` (which knows ``elements``) was not trained on."""
    import ase

    from irrepscope.errors import IrrepscopeError

    z, pos = mols.structure(int(i))
    missing = sorted({int(a) for a in z} - set(elements))
    if missing:
        raise IrrepscopeError(f"structure {int(i)}: elements {missing} are unknown to {model_name}")
    periodic = mols.pbc is not None and bool(mols.pbc[i].any())
    return ase.Atoms(numbers=z, positions=pos, cell=mols.cell[i] if periodic else None, pbc=mols.pbc[i] if periodic else False)


@dataclass
class ModelBatch:
    """Structures as the analysis sees them, plus whatever the family's forward pass takes."""

    num_graphs: int
    atom_graph: torch.Tensor  # long [N]: the molecule (0..num_graphs-1) of each atom
    atomic_numbers: torch.Tensor  # long [N]
    num_edges: int
    inputs: Any  # the family's own batch object


class AnalysedModel(ABC):
    """A trained model as the analysis uses it (see the module docstring)."""

    family: str = "model"
    linear_in_features: bool = False

    @property
    @abstractmethod
    def block_irreps(self) -> list[o3.Irreps]:
        """Irreps of each interaction block's output node features, in order."""

    @property
    def num_blocks(self) -> int:
        return len(self.block_irreps)

    @property
    def orders(self) -> list[int]:
        """Every order that some block puts out."""
        return sorted({ir.l for irreps in self.block_irreps for _, ir in irreps})

    @property
    @abstractmethod
    def parameters(self) -> list[torch.nn.Parameter]:
        """The model's parameters (the analysis turns their gradients off while it runs)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.parameters[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parameters[0].device

    @abstractmethod
    def batches(self, mols: Structures, indices: np.ndarray, batch_size: int) -> Iterator[ModelBatch]:
        """``mols[indices]`` in that order, as batches on the model's device."""

    @abstractmethod
    def forward(self, batch: ModelBatch, hook: NodeHook | None = None) -> torch.Tensor:
        """Predictions [G] in the target's unit; ``hook(i, x)`` sees block ``i``'s output and returns what the rest uses."""

    #: Whether :meth:`energy_and_forces` works: the model predicts an energy whose gradient is its force.
    supports_forces: bool = False

    def energy_and_forces(self, batch: ModelBatch, hook: NodeHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies [G] (eV) and forces ``-dE/dpositions`` [N, 3] (eV/Å, atoms in batch order), through the same hook.

        The forces are recomputed through the hooked forward pass, so an order zeroed by
        the hook is missing from the forces too. Detached results; callable under no_grad.
        """
        raise NotImplementedError(f"{self.family} models do not compute forces here")

    def force_ablation(self, batch: ModelBatch, block: int | None, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies and forces with order ``l`` zeroed after block ``block`` (``None``: after every block)."""
        return self.energy_and_forces(batch, self._zeroing_hook(block, l))

    def zero_order(self, block: int, x: torch.Tensor, l: int) -> torch.Tensor:
        """``x`` (block ``block``'s output) with the columns of order ``l`` set to zero (a copy)."""
        out = x.clone()
        out[:, order_slices(self.block_irreps[block])[l]] = 0
        return out

    def _zeroing_hook(self, block: int | None, l: int) -> NodeHook:
        """A hook that zeroes order ``l`` after block ``block`` (``None``: after every block that has it)."""

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            has_l = any(ir.l == l for _, ir in self.block_irreps[i])
            return self.zero_order(i, x, l) if has_l and (block is None or i == block) else x

        return hook

    def ablation(self, batch: ModelBatch, block: int | None, l: int) -> torch.Tensor:
        """Predictions with order ``l`` zeroed after block ``block`` (``None``: after every block), by re-running."""
        with torch.no_grad():
            return self.forward(batch, self._zeroing_hook(block, l))

    def all_blocks_ablation(self, batch: ModelBatch, orders: list[int]) -> dict[int, torch.Tensor]:
        """Predictions with each order zeroed after every block (generic: one re-run per order)."""
        return {l: self.ablation(batch, None, l) for l in orders}

    def path_moments(self, batch: ModelBatch) -> list[np.ndarray] | None:
        """Per block, whatever :meth:`path_weight_rms` sums over edges; None when the family has no such measure."""
        return None

    def path_weight_rms(self, moments: list[np.ndarray], num_edges: int) -> list[dict[str, Any]]:
        """RMS of each tensor-product path's per-edge weights (rows with block, l_in, l_edge, l_out, rms); [] if none."""
        return []
