"""irrepscope's own model behind the analysis interface, with the exact shortcuts its structure allows.

The model is *linear in its node features*: every block is a tensor product of the
features with edge harmonics, weighted by a radial MLP that sees only edge lengths, plus
a residual; readout, pooling, rescale and the per-element reference are affine. So the
per-(block, order) ablations come exactly from one backward pass (``linear_in_features``),
the all-blocks ablation runs blocks rebuilt without the order
(:class:`~irrepscope.analysis.restricted.OrderRemovedModel`: the same numbers for about
half the work), and the path weights' RMS comes exactly from second moments of the
radial MLP's hidden layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from e3nn import o3

from irrepscope.analysis.interface import AnalysedModel, ModelBatch, NodeHook
from irrepscope.analysis.restricted import OrderRemovedModel
from irrepscope.data.batching import Batch, iterate_batches
from irrepscope.data.structures import Structures
from irrepscope.model.fast_tp import split_radial_mlp
from irrepscope.model.network import EquivariantGraphConv, energy_and_forces


class OwnModel(AnalysedModel):
    """An :class:`~irrepscope.model.network.EquivariantGraphConv` on graphs built as it was trained (``graph``, ``cutoff``)."""

    family = "irrepscope"
    linear_in_features = True

    def __init__(self, model: EquivariantGraphConv, graph: str = "bond", cutoff: float | None = None) -> None:
        self.model = model
        self.graph = graph
        self.cutoff = model.config.cutoff if cutoff is None else cutoff
        self._removed: dict[int, OrderRemovedModel] = {}

    @property
    def block_irreps(self) -> list[o3.Irreps]:
        return [block.irreps_out for block in self.model.blocks]

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def batches(self, mols: Structures, indices: np.ndarray, batch_size: int) -> Iterator[ModelBatch]:
        for batch in iterate_batches(
            mols, indices, batch_size, shuffle=False, seed=None, target=None, graph=self.graph, cutoff=self.cutoff,
            dtype=self.dtype,
        ):  # fmt: skip
            yield self.wrap(batch)

    def wrap(self, batch: Batch) -> ModelBatch:
        """One of our batches (e.g. from :func:`~irrepscope.data.batching.collate`) as the analysis sees it."""
        batch = batch.to(self.device)
        return ModelBatch(batch.num_graphs, batch.batch, batch.z, int(batch.edge_src.numel()), batch)

    def forward(self, batch: ModelBatch, hook: NodeHook | None = None) -> torch.Tensor:
        return self.model(batch.inputs, node_hook=hook).prediction

    @property
    def supports_forces(self) -> bool:
        """Energy models (scalar output): their forces are -dE/dx, also when trained on energies alone."""
        return self.model.scalar_output

    def energy_and_forces(self, batch: ModelBatch, hook: NodeHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, forces = energy_and_forces(self.model, batch.inputs, node_hook=hook)
        return out.prediction.detach(), forces.detach()

    def all_blocks_ablation(self, batch: ModelBatch, orders: list[int]) -> dict[int, torch.Tensor]:
        # Built once per order (copies of the weights), reused for every batch.
        for l in orders:
            if l not in self._removed:
                self._removed[l] = OrderRemovedModel(self.model, l)
        edges = self.model.edge_geometry(batch.inputs)
        return {l: self._removed[l](batch.inputs, edges) for l in orders}

    def path_moments(self, batch: ModelBatch) -> list[np.ndarray]:
        """Per block, ``sum_e h_e h_e^T`` of the radial MLP's hidden layer over the batch's edges."""
        radial = self.model.edge_geometry(batch.inputs).radial
        with torch.no_grad():
            out = []
            for block in self.model.blocks:
                hidden, _ = split_radial_mlp(block.fc, radial)
                out.append((hidden.double().T @ hidden.double()).cpu().numpy())
        return out

    def path_weight_rms(self, moments: list[np.ndarray], num_edges: int) -> list[dict[str, Any]]:
        """RMS over the edges of each path's per-edge weights, exactly from the radial hidden layer's moments.

        ``w_e = h_e @ L``, so ``mean_e w_ej^2 = L_j^T (sum_e h_e h_e^T) L_j / E``: the
        ``[E, weight_numel]`` weight tensor is never built.
        """
        if not moments or num_edges == 0:
            return []
        out = []
        for b, (block, moment) in enumerate(zip(self.model.blocks, moments)):
            _, last = split_radial_mlp(block.fc, block.fc.layer0.weight.new_zeros(1, block.fc.layer0.weight.shape[0]))
            last = last.detach().double().cpu().numpy()  # [K, weight_numel]
            mean_sq = ((moment @ last) * last).sum(0) / num_edges
            start = 0
            for ins in block.tp.instructions:
                n = int(np.prod(ins.path_shape))
                out.append(
                    {
                        "block": b + 1,
                        "l_in": block.tp.irreps_in1[ins.i_in1].ir.l,
                        "l_edge": block.tp.irreps_in2[ins.i_in2].ir.l,
                        "l_out": block.tp.irreps_out[ins.i_out].ir.l,
                        "rms": float(np.sqrt(max(mean_sq[start : start + n].mean(), 0.0))),
                    }
                )
                start += n
        return out


def as_analysed(model: AnalysedModel | EquivariantGraphConv, graph: str = "bond", cutoff: float | None = None) -> AnalysedModel:
    """``model`` itself when it already implements the interface, else our own model wrapped."""
    return model if isinstance(model, AnalysedModel) else OwnModel(model, graph, cutoff)
