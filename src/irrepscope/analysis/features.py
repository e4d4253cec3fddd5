"""One pass of a trained model over a split: per-order invariants, norms, gradients, path-weight moments.

The reference model is *linear in its node features*: every block is a tensor product of
the features with edge harmonics, weighted by a radial MLP that sees only edge lengths,
plus a residual; readout and pooling are linear. So each molecule's prediction is an
affine function of the node features after any block ``b``, and zeroing order ``l``
there changes the prediction by exactly ``-sum_atoms <dpred/dx_b^l, x_b^l>``. One
backward pass therefore gives the ablation effect of every (block, order) at once,
instead of re-running the later blocks 35 times; :func:`rerun_ablation` does it the
direct way, and the tests check that both agree. Zeroing an order after *every* block
cannot be read off one gradient: :func:`all_blocks_ablation` re-runs the model once per
order, with the order left out of every block (``restricted``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from irrepscope.analysis.restricted import OrderRemovedModel
from irrepscope.data.batching import Batch, iterate_batches
from irrepscope.data.qm9 import Molecules
from irrepscope.model.fast_tp import split_radial_mlp
from irrepscope.model.network import EquivariantGraphConv
from irrepscope.orders import invariant_norms, order_slices, split_by_order

Progress = Callable[[Iterable, int, str], Iterable]


def _no_progress(it: Iterable, total: int, desc: str) -> Iterable:
    return it


@dataclass
class SplitPass:
    """What one pass over ``indices`` collected (``B`` blocks, orders in ``orders``)."""

    indices: np.ndarray  # [M] dataset indices, in pass order
    orders: list[int]
    prediction: np.ndarray  # [M] target unit
    target: np.ndarray | None  # [M] or None when the pass had no target
    heavy_atoms: np.ndarray  # [M]
    # Per block: order -> [M, H] rotation-invariant graph features (l=0 as is, l>0 per-copy norms)
    graph_invariants: list[dict[int, np.ndarray]]
    node_sq: np.ndarray  # [B, n_orders] sum over atoms of the squared norm of each order block
    graph_sq: np.ndarray  # [B, n_orders] sum over molecules of the squared norm of the pooled order block
    # [B] the same sums over *all* of the model's orders, whatever ``orders`` holds: the
    # denominators of the norm shares, so that analysing a subset does not inflate them.
    node_sq_total: np.ndarray
    graph_sq_total: np.ndarray
    num_atoms: int = 0
    # With gradients only:
    grad_x_input: np.ndarray | None = None  # [B, n_orders] sum over atoms of sum_u |<g_u, x_u>|
    ablation_prediction: np.ndarray | None = None  # [B, n_orders, M] prediction with order zeroed at block b
    path_moment: list[np.ndarray] = field(default_factory=list)  # per block [K, K]: sum_e h_e h_e^T
    num_edges: int = 0


def zero_order(x: torch.Tensor, model: EquivariantGraphConv, l: int) -> torch.Tensor:
    """``x`` with the columns of order ``l`` set to zero (a copy)."""
    out = x.clone()
    out[:, order_slices(model.irreps_hidden)[l]] = 0
    return out


def rerun_ablation(model: EquivariantGraphConv, batch: Batch, block: int | None, l: int) -> torch.Tensor:
    """Predictions with order ``l`` zeroed after block ``block`` (``None``: after every block), by re-running.

    The direct definition of the ablation; used for the all-blocks measure and to check
    the gradient shortcut.
    """

    def hook(i: int, x: torch.Tensor) -> torch.Tensor:
        return zero_order(x, model, l) if block is None or i == block else x

    with torch.no_grad():
        return model(batch, node_hook=hook).prediction


def all_blocks_ablation(
    model: EquivariantGraphConv,
    batch: Batch,
    orders: list[int],
    removed: dict[int, OrderRemovedModel] | None = None,
) -> dict[int, torch.Tensor]:
    """Predictions with each order zeroed after every block.

    Each order is left out of every block (:class:`OrderRemovedModel`) rather than computed
    and discarded: the same numbers for about half the work. Build ``removed`` once with
    :func:`order_removed_models` and pass it for every batch.
    """
    removed = removed if removed is not None else order_removed_models(model, orders)
    edges = model.edge_geometry(batch)
    return {l: removed[l](batch, edges) for l in orders}


def order_removed_models(model: EquivariantGraphConv, orders: list[int]) -> dict[int, OrderRemovedModel]:
    """One :class:`OrderRemovedModel` per order (copies of the weights: rebuild after changing the model)."""
    return {l: OrderRemovedModel(model, l) for l in orders}


def collect(
    model: EquivariantGraphConv,
    mols: Molecules,
    indices: np.ndarray,
    *,
    target: str | None,
    graph: str,
    cutoff: float,
    orders: list[int] | None = None,
    batch_size: int = 256,
    gradients: bool = True,
    progress: Progress = _no_progress,
    desc: str = "features",
) -> SplitPass:
    """Run ``model`` over ``mols[indices]`` once and collect a :class:`SplitPass`.

    With ``gradients``, also the gradient of each molecule's prediction w.r.t. every
    block's output (one backward per batch), the per-(block, order) ablation predictions
    derived from it and the second moments of the radial MLP's hidden layer.

    ``orders`` restricts the per-order measures; the squared norm of each whole block (all
    of the model's orders) is always summed too (``node_sq_total``/``graph_sq_total``).
    """
    orders = list(orders if orders is not None else model.orders)
    irreps = model.irreps_hidden
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    nb, no = len(model.blocks), len(orders)
    preds, targets, heavy = [], [], []
    inv = [{l: [] for l in orders} for _ in range(nb)]
    node_sq = np.zeros((nb, no))
    graph_sq = np.zeros((nb, no))
    node_sq_total = np.zeros(nb)
    graph_sq_total = np.zeros(nb)
    gxi = np.zeros((nb, no))
    abl: list[np.ndarray] = []
    moments = [None] * nb
    num_atoms = num_edges = 0
    batches = iterate_batches(
        mols, indices, batch_size, shuffle=False, seed=None, target=target, graph=graph, cutoff=cutoff, dtype=dtype
    )
    total = (len(indices) + batch_size - 1) // batch_size
    was_training = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients w.r.t. features only: no parameter gradients are built
    try:
        for batch in progress(batches, total, desc):
            batch = batch.to(device)
            edges = model.edge_geometry(batch)
            with torch.set_grad_enabled(gradients):
                x = model.embedding(batch.z).to(dtype)
                if gradients:
                    x = x.detach().requires_grad_(True)
                xs = []
                for block in model.blocks:
                    x = block(x, edges)
                    xs.append(x)
                pred = model.head(x, batch)[0]
                grads = torch.autograd.grad(pred.sum(), xs) if gradients else [None] * nb
            g_count = batch.num_graphs
            abl_batch = np.zeros((nb, no, g_count))
            for b, (xb, gb) in enumerate(zip(xs, grads)):
                xb = xb.detach()
                pooled = torch.zeros(g_count, xb.shape[1], dtype=xb.dtype, device=device).index_add(0, batch.batch, xb)
                x_by = split_by_order(xb, irreps)
                p_by = split_by_order(pooled, irreps)
                g_by = split_by_order(gb, irreps) if gb is not None else None
                node_sq_total[b] += float((xb.double() ** 2).sum())
                graph_sq_total[b] += float((pooled.double() ** 2).sum())
                for j, l in enumerate(orders):
                    node_sq[b, j] += float((x_by[l].double() ** 2).sum())
                    graph_sq[b, j] += float((p_by[l].double() ** 2).sum())
                    feats = p_by[l][..., 0] if l == 0 else invariant_norms(p_by[l])
                    inv[b][l].append(feats.double().cpu().numpy())
                    if g_by is not None:
                        dot = (g_by[l] * x_by[l]).sum(-1).double()  # [N, H]: <g_u, x_u> per copy
                        gxi[b, j] += float(dot.abs().sum())
                        per_mol = torch.zeros(g_count, dtype=dot.dtype, device=device).index_add(0, batch.batch, dot.sum(-1))
                        abl_batch[b, j] = (pred.detach().double() - per_mol).cpu().numpy()
            if gradients:
                abl.append(abl_batch)
                with torch.no_grad():
                    for b, block in enumerate(model.blocks):
                        hidden, _ = split_radial_mlp(block.fc, edges.radial)
                        m = (hidden.double().T @ hidden.double()).cpu().numpy()
                        moments[b] = m if moments[b] is None else moments[b] + m
                num_edges += int(batch.edge_src.numel())
            preds.append(pred.detach().double().cpu().numpy())
            if batch.y is not None:
                targets.append(batch.y.double().cpu().numpy())
            heavy.append(torch.zeros(g_count, dtype=torch.long).index_add(0, batch.batch.cpu(), (batch.z.cpu() > 1).long()).numpy())
            num_atoms += int(batch.z.numel())
    finally:
        for p, flag in zip(model.parameters(), was_training):
            p.requires_grad_(flag)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    return SplitPass(
        indices=np.asarray(indices, dtype=np.int64),
        orders=orders,
        prediction=cat(preds),
        target=cat(targets) if targets else None,
        heavy_atoms=cat(heavy),
        graph_invariants=[{l: (np.concatenate(v[l]) if v[l] else np.zeros((0, 0))) for l in orders} for v in inv],
        node_sq=node_sq,
        graph_sq=graph_sq,
        node_sq_total=node_sq_total,
        graph_sq_total=graph_sq_total,
        num_atoms=num_atoms,
        grad_x_input=gxi if gradients else None,
        ablation_prediction=np.concatenate(abl, axis=2) if abl else None,
        path_moment=[m for m in moments if m is not None],
        num_edges=num_edges,
    )
