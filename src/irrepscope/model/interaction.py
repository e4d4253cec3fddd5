"""One interaction block: a fully connected tensor product of node features with edge harmonics.

Messages ``m_ij = TP(x_j, Y(r_ij); w(|r_ij|))`` use per-edge weights ``w`` from a radial
MLP; they are summed on the receiving atom and divided by a constant. The parameters
live in the radial MLP only, so a block has the same ``state_dict`` whichever backend
computes the tensor product; the backend is a runtime switch (:meth:`set_backend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet

from irrepscope.compat import quiet_e3nn
from irrepscope.errors import IrrepscopeError
from irrepscope.orders import hidden_irreps, sh_irreps


@dataclass
class EdgeGeometry:
    """Per-edge quantities shared by all blocks of one forward pass."""

    src: torch.Tensor  # [E] sending atom
    dst: torch.Tensor  # [E] receiving atom
    vec: torch.Tensor  # [E, 3] edge vector (sender minus receiver, e3nn's convention)
    radial: torch.Tensor  # [E, num_basis] radial basis of the edge length
    orders: list[int]
    _sh: torch.Tensor | None = None
    _frame: object | None = None

    @property
    def sh(self) -> torch.Tensor:
        """Spherical harmonics of the unit edge vector for exactly the listed orders (integral normalisation)."""
        if self._sh is None:
            self._sh = o3.spherical_harmonics(sh_irreps(self.orders), self.vec, normalize=True, normalization="integral")
        return self._sh

    def frame(self):
        """Per-edge rotation onto the e3nn pole axis, computed once for all blocks (fast backend)."""
        if self._frame is None:
            from irrepscope.model.fast_tp import EdgeFrame

            self._frame = EdgeFrame(self.vec, max(self.orders))
        return self._frame


class InteractionBlock(torch.nn.Module):
    """Fully connected tensor product ``irreps_in x Y(orders) -> mul x every order``, weighted per edge.

    A residual connection is added when input and output irreps are equal (every block
    but the first).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps | str,
        orders: list[int],
        mul: int,
        num_basis: int,
        radial_hidden: int,
        aggregation_norm: float,
        backend: str = "fast",
    ) -> None:
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_sh = sh_irreps(orders)
        self.irreps_out = hidden_irreps(orders, mul)
        self.aggregation_norm = aggregation_norm
        self.residual = self.irreps_in == self.irreps_out
        with quiet_e3nn():
            self.tp = o3.FullyConnectedTensorProduct(
                self.irreps_in, self.irreps_sh, self.irreps_out, shared_weights=False, internal_weights=False
            )
            self.fc = FullyConnectedNet([num_basis, radial_hidden, self.tp.weight_numel], torch.nn.functional.silu)
        self._fast = None
        self.backend = "e3nn"
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """Choose who computes the tensor product: ``"e3nn"`` (reference) or ``"fast"``; weights are shared."""
        if backend not in ("e3nn", "fast"):
            raise IrrepscopeError(f"unknown backend {backend!r}; choose 'e3nn' or 'fast'")
        if backend == "fast" and self._fast is None:
            from irrepscope.model.fast_tp import FastTensorProduct

            self._fast = FastTensorProduct(self.tp)
            self._fast.to(device=self.fc.layer0.weight.device)
        self.backend = backend

    def forward(self, x: torch.Tensor, edges: EdgeGeometry) -> torch.Tensor:
        if self.backend == "fast":
            # The radial MLP's last layer is folded into the product: fc(radial) is never built.
            messages = self._fast(x[edges.src], edges.frame(), radial=edges.radial, fc=self.fc)
        else:
            messages = self.tp(x[edges.src], edges.sh, self.fc(edges.radial))
        out = torch.zeros(x.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device)
        out = out.index_add(0, edges.dst, messages) / self.aggregation_norm
        if self.residual:
            out = out + x
        return out
