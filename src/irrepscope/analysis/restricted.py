"""Blocks restricted to a subset of orders: the all-blocks ablation without wasted work.

Zeroing order ``l`` after every block is the same as running every block with order
``l`` removed from its input *and* its output. So instead of computing all paths and
then throwing order ``l`` away, :class:`RestrictedBlock` builds a smaller tensor product
that holds only the surviving paths (same path coefficients, the radial MLP's output
columns of those paths), and the last block computes only the orders the readout reads
(``0e``): for [0..6]/H=16 this does about half the work of re-running the full blocks.
Exactness against the hook-zeroed model is checked by the tests.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection

import torch
from e3nn import o3

from irrepscope.compat import quiet_e3nn
from irrepscope.data.batching import Batch
from irrepscope.model.interaction import EdgeGeometry, InteractionBlock
from irrepscope.model.network import EquivariantGraphConv
from irrepscope.orders import order_slices


def _columns(irreps: o3.Irreps, orders: Collection[int]) -> list[int]:
    """Columns of ``irreps`` that belong to ``orders`` (ascending)."""
    return [c for l, sl in order_slices(irreps).items() if l in orders for c in range(sl.start, sl.stop)]


def _sub_irreps(irreps: o3.Irreps, orders: Collection[int]) -> o3.Irreps:
    return o3.Irreps([(mul, ir) for mul, ir in irreps if ir.l in orders])


class RestrictedBlock(torch.nn.Module):
    """``block`` computed as if its input held only ``in_orders`` and only ``out_orders`` of its output were kept.

    Input and output are laid out by the restricted irreps (the block's irreps without
    the dropped orders). The parameters are copies: later edits of ``block`` do not reach it.
    """

    def __init__(self, block: InteractionBlock, in_orders: Collection[int], out_orders: Collection[int]) -> None:
        super().__init__()
        tp = block.tp
        self.irreps_in = _sub_irreps(block.irreps_in, in_orders)
        self.irreps_out = _sub_irreps(block.irreps_out, out_orders)
        if len(self.irreps_in) == 0 or len(self.irreps_out) == 0:
            raise ValueError("a restricted block needs at least one input and one output order")
        index_in = {ir.l: i for i, (_, ir) in enumerate(self.irreps_in)}
        index_out = {ir.l: i for i, (_, ir) in enumerate(self.irreps_out)}
        instructions, columns, offset = [], [], 0
        for ins in tp.instructions:
            n = math.prod(ins.path_shape)
            l1, l3 = tp.irreps_in1[ins.i_in1].ir.l, tp.irreps_out[ins.i_out].ir.l
            if l1 in index_in and l3 in index_out:
                # No normalisation of its own: the final coefficient sqrt(path_weight) is the full product's.
                instructions.append((index_in[l1], ins.i_in2, index_out[l3], ins.connection_mode, ins.has_weight, ins.path_weight**2))
                columns.extend(range(offset, offset + n))
            offset += n
        with quiet_e3nn():
            self.tp = o3.TensorProduct(
                self.irreps_in,
                tp.irreps_in2,
                self.irreps_out,
                instructions,
                irrep_normalization="none",
                path_normalization="none",
                shared_weights=False,
                internal_weights=False,
                # e3nn's code generation is the slow part of building a product; the fast backend never calls it.
                compile_left_right=block.backend != "fast",
            )
        # The radial MLP with only the surviving paths' output columns (e3nn's layer scale
        # depends on its input width only, so slicing the weight is exact).
        self.fc = copy.deepcopy(block.fc)
        last = list(self.fc.children())[-1]
        last.weight = torch.nn.Parameter(last.weight.detach()[:, columns].clone(), requires_grad=False)
        last.h_out = len(columns)
        self.aggregation_norm = block.aggregation_norm
        # Residual: the block adds its input to its output; keep the input columns of the kept outputs.
        self.residual_columns: torch.Tensor | None = None
        if block.residual:
            self.register_buffer("_residual", torch.tensor(_columns(self.irreps_in, out_orders), dtype=torch.long), persistent=False)
            self.residual_columns = self._residual
        self.backend = block.backend
        self._fast = None
        if self.backend == "fast":
            from irrepscope.model.fast_tp import FastTensorProduct

            self._fast = FastTensorProduct(self.tp)

    def forward(self, x: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        # Mirrors InteractionBlock.forward on the restricted irreps.
        if self._fast is not None:
            messages = self._fast(x[edges.src], edges.frame(), radial=edges.radial, fc=self.fc)
        else:
            messages = self.tp(x[edges.src], edges.sh, self.fc(edges.radial))
        out = torch.zeros(x.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device)
        out = out.index_add(0, edges.dst, messages) / self.aggregation_norm
        if self.residual_columns is not None:
            out = out + x.index_select(1, self.residual_columns.to(x.device))
        return out


def readout_orders(model: EquivariantGraphConv) -> set[int]:
    """Orders of the hidden features that the readout reads (``{0}`` for a scalar target)."""
    readout = model.readout
    return {readout.irreps_in[ins.i_in].ir.l for ins in readout.instructions}


class OrderRemovedModel(torch.nn.Module):
    """``model`` with order ``l`` zeroed after every block, computed without order ``l`` at all.

    ``forward(batch)`` returns the predictions (target unit). When ``l`` is the only order
    the readout reads, the prediction is the affine offset alone and nothing is computed.
    """

    def __init__(self, model: EquivariantGraphConv, l: int) -> None:
        super().__init__()
        self.model = model
        self.l = l
        kept = [o for o in model.orders if o != l]
        self.head_orders = sorted(readout_orders(model) - {l})
        blocks = []
        if self.head_orders:
            for i, block in enumerate(model.blocks):
                last = i == len(model.blocks) - 1
                in_orders = [ir.l for _, ir in block.irreps_in] if i == 0 else kept
                blocks.append(RestrictedBlock(block, in_orders, self.head_orders if last else kept))
        param = next(model.parameters())
        self.blocks = torch.nn.ModuleList(blocks).to(dtype=param.dtype, device=param.device)
        self.head_columns = _columns(model.irreps_hidden, self.head_orders)

    @torch.no_grad()
    def forward(self, batch: Batch, edges: EdgeGeometry | None = None) -> torch.Tensor:
        model = self.model
        dtype = batch.pos.dtype
        full = torch.zeros(batch.z.shape[0], model.irreps_hidden.dim, dtype=dtype, device=batch.pos.device)
        if self.blocks:
            edges = edges if edges is not None else model.edge_geometry(batch)
            x = model.embedding(batch.z).to(dtype)
            for block in self.blocks:
                x = block(x, edges)
            full[:, self.head_columns] = x
        # Without blocks (l was the only order read out) the prediction is the head's offset alone.
        return model.head(full, batch)[0]
