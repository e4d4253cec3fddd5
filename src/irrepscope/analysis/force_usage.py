"""Which orders a force field's forces need: zero an order, recompute the forces through the hooked model.

For every (block, order) and for every order after all blocks, the forces are recomputed
through the model's own forward pass with the order zeroed by the hook (the gradient
flows through the ablated features), and their MAE per component is compared with the
unablated model's on the same structures. No linear shortcut: the forces of an ablated
model are a second derivative away from the one backward pass the energy shortcut uses,
and other families are nonlinear anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from irrepscope.analysis.interface import AnalysedModel
from irrepscope.data.structures import FORCES, Structures

Progress = Callable[[Iterable, int, str], Iterable]


@dataclass
class ForcePass:
    """Force errors of a model and of its ablations on one set of structures."""

    indices: np.ndarray  # [M] the structures
    num_atoms: int
    force_mae: float  # eV/Å, per component, unablated
    force_rmse: float
    baseline_mae: float  # the zero-force baseline on the same atoms: mean |F|
    # (block or None for every block, order) -> force MAE with that order zeroed; blocks without the order are absent
    ablated_mae: dict[tuple[int | None, int], float]

    def delta(self, block: int | None, l: int) -> float:
        """Force MAE with order ``l`` zeroed after ``block`` (None: every block) minus the model's; NaN where absent."""
        value = self.ablated_mae.get((block, l))
        return float("nan") if value is None else value - self.force_mae


def force_pass(
    model: AnalysedModel,
    structures: Structures,
    indices: np.ndarray,
    orders: list[int],
    batch_size: int,
    progress: Progress,
) -> ForcePass:
    """Force MAE of ``model`` on ``structures[indices]``, unablated and with each order zeroed per block and after all."""
    indices = np.asarray(indices, dtype=np.int64)
    cases: list[tuple[int | None, int]] = [
        (b, l) for b, irreps in enumerate(model.block_irreps) for l in orders if any(ir.l == l for _, ir in irreps)
    ] + [(None, l) for l in orders]
    abs_sum = {case: 0.0 for case in cases}
    base_abs = base_sq = truth_abs = 0.0
    count = 0
    chunks = [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]
    for chunk in progress(chunks, len(chunks), "force ablations"):
        truth = structures.atom_values(FORCES, chunk)
        (batch,) = list(model.batches(structures, chunk, len(chunk)))
        _, forces = model.energy_and_forces(batch)
        err = forces.double().cpu().numpy() - truth
        base_abs += float(np.abs(err).sum())
        base_sq += float((err**2).sum())
        truth_abs += float(np.abs(truth).sum())
        count += truth.size
        for block, l in cases:
            _, ablated = model.force_ablation(batch, block, l)
            abs_sum[(block, l)] += float(np.abs(ablated.double().cpu().numpy() - truth).sum())
    return ForcePass(
        indices=indices,
        num_atoms=count // 3,
        force_mae=base_abs / count,
        force_rmse=float(np.sqrt(base_sq / count)),
        baseline_mae=truth_abs / count,
        ablated_mae={case: total / count for case, total in abs_sum.items()},
    )
