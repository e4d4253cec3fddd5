"""The study's equivariant graph convolution (Lee, Galkin, Miret 2024), built on e3nn.

embedding (64x0e) -> block 1 (64x0e -> H x every order) -> blocks 2..n (residual)
-> equivariant linear readout to one scalar per atom -> sum over the molecule -> affine
rescale from the standardised target to its unit -> plus the molecule's per-element
reference (the sum over its atoms of a value per element, fitted on the training split;
zeros in the published recipe). Everything after the last block is :meth:`head`, the
one place the analysis also goes through.

For a vector or tensor target (``output`` 1o or 2e) the readout maps each atom's
features of that order to one vector or tensor, summed over the molecule and scaled (no
shift, no reference: either would break equivariance). A charge-times-position readout
would let scalar features alone carry a dipole; the linear readout makes the target's
order at the last block the only way in, which is what a positive control of the
analysis needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from e3nn import o3

from irrepscope.compat import quiet_e3nn
from irrepscope.config import Config, ModelConfig
from irrepscope.model.interaction import EdgeGeometry, InteractionBlock
from irrepscope.model.radial import bessel_basis
from irrepscope.orders import hidden_irreps

if TYPE_CHECKING:
    from irrepscope.data.batching import Batch

NodeHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class ModelOutput:
    """What a forward pass returns: the prediction and, on request, every intermediate feature."""

    prediction: torch.Tensor  # [G] in the target's unit ([G, 2l+1] for a vector or tensor target)
    standardized: torch.Tensor  # [G] (or [G, 2l+1]) before the affine rescale (what the loss sees)
    node_features: list[torch.Tensor] | None = None  # per block, [N, irreps.dim]
    graph_features: torch.Tensor | None = None  # [G, irreps.dim]: sum over atoms of the last block
    auxiliary: dict[str, torch.Tensor] | None = None  # per auxiliary head, standardised [G, 2l+1]


class EquivariantGraphConv(torch.nn.Module):
    """The reference model; ``config.backend`` picks the tensor-product implementation."""

    def __init__(self, config: ModelConfig, output: str = "0e", auxiliary: dict[str, str] | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.output = o3.Irreps(output)  # of one molecule's prediction: 0e, 1o or 2e
        if len(self.output) != 1 or self.output[0].mul != 1 or self.output[0].ir not in self.output_choices(config):
            raise ValueError(f"output {output!r} must be one irrep carried by the hidden features {self.output_choices(config)}")
        self.orders = list(config.orders)
        self.irreps_hidden = hidden_irreps(self.orders, config.hidden_mul)
        self.embedding = torch.nn.Embedding(config.num_elements, config.embedding_dim)
        radial_hidden = config.radial_hidden or config.hidden_mul
        blocks = []
        irreps_in = o3.Irreps(f"{config.embedding_dim}x0e")
        for _ in range(config.num_blocks):
            block = InteractionBlock(
                irreps_in,
                self.orders,
                config.hidden_mul,
                config.num_basis,
                radial_hidden,
                config.aggregation_norm,
                backend=config.backend,
            )
            blocks.append(block)
            irreps_in = block.irreps_out
        self.blocks = torch.nn.ModuleList(blocks)
        # Multi-task: one more linear head per auxiliary vector/tensor target, on the same last block.
        auxiliary = dict(auxiliary or {})
        with quiet_e3nn():
            self.readout = o3.Linear(self.irreps_hidden, self.output)
            self.auxiliary_heads = torch.nn.ModuleDict({name: o3.Linear(self.irreps_hidden, ir) for name, ir in auxiliary.items()})
        self.register_buffer("auxiliary_std", torch.ones(len(auxiliary)))
        # Affine rescale of the standardised output; set from the training split's statistics.
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        # Per-element reference (target unit), indexed by atomic number; zeros = none.
        self.register_buffer("element_reference", torch.zeros(config.num_elements))
        self._register_load_state_dict_pre_hook(_fill_missing_buffers, with_module=True)

    @staticmethod
    def output_choices(config: ModelConfig) -> list[o3.Irrep]:
        return [ir for _, ir in hidden_irreps(config.orders, 1)]

    @property
    def scalar_output(self) -> bool:
        return self.output.dim == 1

    @property
    def backend(self) -> str:
        return self.blocks[0].backend

    def set_backend(self, backend: str) -> None:
        """Switch every block between the e3nn reference and the fast tensor product (same weights)."""
        for block in self.blocks:
            block.set_backend(backend)

    def set_target_stats(self, mean: float, std: float) -> None:
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(float(std))

    def set_element_reference(self, values: "torch.Tensor | list[float]") -> None:
        """Per-element reference values indexed by atomic number (length ``num_elements``)."""
        values = torch.as_tensor(values, dtype=self.element_reference.dtype)
        if values.shape != self.element_reference.shape:
            raise ValueError(f"element reference needs {self.element_reference.numel()} values, got {tuple(values.shape)}")
        self.element_reference.copy_(values)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def edge_geometry(self, batch: "Batch") -> EdgeGeometry:
        vec = batch.pos[batch.edge_src] - batch.pos[batch.edge_dst]
        radial = bessel_basis(vec.norm(dim=1), self.config.cutoff, self.config.num_basis, self.config.radial_envelope)
        return EdgeGeometry(batch.edge_src, batch.edge_dst, vec, radial, self.orders)

    def forward(
        self,
        batch: "Batch",
        return_features: bool = False,
        node_hook: NodeHook | None = None,
    ) -> ModelOutput:
        """Predict one value per molecule.

        ``node_hook(block_index, features)`` may replace each block's output (ablation)
        or keep a handle on it (gradients); ``return_features`` keeps every block's node
        features and the sum-pooled graph features.
        """
        edges = self.edge_geometry(batch)
        x = self.embedding(batch.z).to(batch.pos.dtype)
        kept = []
        for i, block in enumerate(self.blocks):
            x = block(x, edges)
            if node_hook is not None:
                x = node_hook(i, x)
            if return_features:
                kept.append(x)
        prediction, standardized = self.head(x, batch)
        aux = None
        if len(self.auxiliary_heads):
            aux = {name: self._pool(head(x), batch) for name, head in self.auxiliary_heads.items()}
        graph = None
        if return_features:
            graph = torch.zeros(batch.num_graphs, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, batch.batch, x)
        return ModelOutput(prediction, standardized, kept if return_features else None, graph, aux)

    def auxiliary_predictions(self, out: ModelOutput) -> dict[str, torch.Tensor]:
        """The auxiliary heads' predictions in their targets' units."""
        return {name: out.auxiliary[name] * self.auxiliary_std[k] for k, name in enumerate(self.auxiliary_heads)}

    @staticmethod
    def _pool(per_atom: torch.Tensor, batch: "Batch") -> torch.Tensor:
        return per_atom.new_zeros(batch.num_graphs, per_atom.shape[1]).index_add(0, batch.batch, per_atom)


    def head(self, x: torch.Tensor, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """Last block's node features -> (prediction in the target unit, standardised sum).

        Readout to one scalar per atom, sum per molecule, affine rescale, plus the
        per-element reference. Affine in ``x``: the analysis's exact shortcuts rely on it.
        A vector or tensor output is only scaled: ``[G, 2l+1]`` instead of ``[G]``.
        """
        standardized = self._pool(self.readout(x), batch)
        if not self.scalar_output:
            return standardized * self.target_std, standardized
        standardized = standardized.squeeze(-1)
        return standardized * self.target_std + self.target_mean + self.reference_sum(batch), standardized

    def reference_sum(self, batch: "Batch") -> torch.Tensor:
        """Per molecule, the sum of its atoms' per-element reference values [G] (zeros without a reference)."""
        ref = self.element_reference.to(batch.pos.dtype)[batch.z]
        return ref.new_zeros(batch.num_graphs).index_add(0, batch.batch, ref)


def _fill_missing_buffers(module, state_dict, prefix, *args) -> None:
    # Checkpoints written before these buffers existed: no per-element reference (zeros)
    # and no auxiliary heads (an empty scale vector).
    for name, fill in (("element_reference", torch.zeros_like), ("auxiliary_std", torch.ones_like)):
        if prefix + name not in state_dict:
            state_dict[prefix + name] = fill(getattr(module, name))


def build_model(config: ModelConfig, target: str = "U0_atomization", auxiliary: Sequence[str] = ()) -> EquivariantGraphConv:
    """Build the model described by ``config`` for ``target`` (and auxiliary heads); fresh weights: seed torch first."""
    from irrepscope.data.multipoles import target_irreps

    return EquivariantGraphConv(config, target_irreps(target), {name: target_irreps(name) for name in auxiliary})


def build_run_model(config: Config) -> EquivariantGraphConv:
    """The model of a run's whole config: its architecture, target and auxiliary heads."""
    return build_model(config.model, config.data.target, config.data.auxiliary)


def energy_and_forces(
    model: EquivariantGraphConv, batch: "Batch", *, node_hook: NodeHook | None = None, create_graph: bool = False
) -> tuple[ModelOutput, torch.Tensor]:
    """The model's output and the forces ``-dE/dpositions`` [N, 3] (eV/Å for an energy in eV), by autograd.

    The exact gradient of the predicted energy, whatever the graph; it is a force field's
    force only where the energy is smooth in the positions (radius graph with the
    polynomial envelope; see :func:`irrepscope.config.check_force_field`).
    ``create_graph`` keeps the graph of the forces (training on them: the fast backend
    is differentiable twice). Works inside ``torch.no_grad`` too.
    """
    from dataclasses import replace

    if not model.scalar_output:
        raise ValueError("forces are the gradient of a scalar energy; this model predicts a vector or tensor")
    with torch.enable_grad():
        pos = batch.pos.detach().requires_grad_(True)
        out = model(replace(batch, pos=pos), node_hook=node_hook)
        (grad,) = torch.autograd.grad(out.prediction.sum(), pos, create_graph=create_graph)
    return out, -grad
