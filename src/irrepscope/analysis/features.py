"""One pass of a trained model over a split: per-order invariants, norms, gradients, ablations.

Works on any :class:`~irrepscope.analysis.interface.AnalysedModel`: the model's own
forward pass runs once per batch with a hook that keeps every block's output. With
gradients, one backward pass gives ``dpred/dx`` for every block; then:

* ``grad_x_input``: per atom, ``sum_u |<dpred/dx_u, x_u>|`` over an order's copies;
* the per-(block, order) ablation (prediction with order ``l`` zeroed after block ``b``):
  for a model that is linear in its features (``linear_in_features``) exactly
  ``pred - sum_atoms <dpred/dx_b^l, x_b^l>``, read off that one backward pass; for any
  other model by re-running it with the order zeroed (the direct definition, which the
  tests check the shortcut against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from irrepscope.analysis.interface import AnalysedModel
from irrepscope.data.structures import Structures
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
    path_moment: list[np.ndarray] = field(default_factory=list)  # per block, what the family's path_weight_rms reads
    num_edges: int = 0


def collect(
    model: AnalysedModel,
    mols: Structures,
    indices: np.ndarray,
    *,
    target: str | None,
    orders: list[int] | None = None,
    batch_size: int = 256,
    gradients: bool = True,
    progress: Progress = _no_progress,
    desc: str = "features",
) -> SplitPass:
    """Run ``model`` over ``mols[indices]`` once and collect a :class:`SplitPass`.

    ``target``: the property whose values go with the pass (float64, from ``mols``).
    With ``gradients``, also the gradient of each molecule's prediction w.r.t. every
    block's output, the per-(block, order) ablation predictions and the path moments.
    ``orders`` restricts the per-order measures; the squared norm of each whole block (all
    of its orders) is always summed too (``node_sq_total``/``graph_sq_total``).
    """
    orders = list(orders if orders is not None else model.orders)
    nb, no = model.num_blocks, len(orders)
    slices = [order_slices(irreps) for irreps in model.block_irreps]
    preds, heavy = [], []
    inv = [{l: [] for l in orders} for _ in range(nb)]
    node_sq = np.zeros((nb, no))
    graph_sq = np.zeros((nb, no))
    node_sq_total = np.zeros(nb)
    graph_sq_total = np.zeros(nb)
    gxi = np.zeros((nb, no))
    abl: list[np.ndarray] = []
    moments: list[np.ndarray] | None = None
    num_atoms = num_edges = 0
    total = (len(indices) + batch_size - 1) // batch_size
    flags = [p.requires_grad for p in model.parameters]
    for p in model.parameters:
        p.requires_grad_(False)  # gradients w.r.t. features only: no parameter gradients are built
    try:
        for batch in progress(model.batches(mols, indices, batch_size), total, desc):
            xs: list[torch.Tensor] = []

            def keep(i: int, x: torch.Tensor) -> torch.Tensor:
                if gradients and not x.requires_grad:
                    x = x.detach().requires_grad_(True)  # the first block's output: a leaf to differentiate at
                xs.append(x)
                return x

            with torch.set_grad_enabled(gradients):
                pred = model.forward(batch, keep)
                # One gradient per output component ([G] for a scalar target, [G, k] for a vector or tensor).
                parts = [pred] if pred.dim() == 1 else list(pred.unbind(1))
                grads = (
                    list(zip(*[torch.autograd.grad(p.sum(), xs, retain_graph=True) for p in parts]))
                    if gradients
                    else [None] * nb
                )
            pred = pred.detach()
            g_count = batch.num_graphs
            abl_batch = np.zeros((nb, no, *pred.shape))
            for b, (xb, gb) in enumerate(zip(xs, grads)):
                xb = xb.detach()
                irreps = model.block_irreps[b]
                pooled = torch.zeros(g_count, xb.shape[1], dtype=xb.dtype, device=xb.device).index_add(0, batch.atom_graph, xb)
                x_by = split_by_order(xb, irreps)
                p_by = split_by_order(pooled, irreps)
                g_by = [split_by_order(g, irreps) for g in gb] if gb is not None else None
                node_sq_total[b] += float((xb.double() ** 2).sum())
                graph_sq_total[b] += float((pooled.double() ** 2).sum())
                for j, l in enumerate(orders):
                    if l not in slices[b]:  # this block does not carry order l (e.g. a scalars-only last layer)
                        abl_batch[b, j] = pred.double().cpu().numpy()
                        continue
                    node_sq[b, j] += float((x_by[l].double() ** 2).sum())
                    graph_sq[b, j] += float((p_by[l].double() ** 2).sum())
                    feats = p_by[l][..., 0] if l == 0 else invariant_norms(p_by[l])
                    inv[b][l].append(feats.double().cpu().numpy())
                    if g_by is not None:
                        # [N, H] per output component: <g_u, x_u> per copy
                        dots = [(g[l] * x_by[l]).sum(-1).double() for g in g_by]
                        # |<g, x>| per atom and copy; for a vector output the length over components (invariant)
                        gxi[b, j] += float(torch.linalg.vector_norm(torch.stack(dots), dim=0).sum())
                        if model.linear_in_features:
                            per_mol = torch.stack(
                                [torch.zeros(g_count, dtype=d.dtype, device=d.device).index_add(0, batch.atom_graph, d.sum(-1))
                                 for d in dots], -1,
                            ).reshape(pred.shape)  # fmt: skip
                            abl_batch[b, j] = (pred.double() - per_mol).cpu().numpy()
                        else:
                            abl_batch[b, j] = model.ablation(batch, b, l).double().cpu().numpy()
            if gradients:
                abl.append(abl_batch)
                m = model.path_moments(batch)
                if m is not None:
                    moments = m if moments is None else [a + c for a, c in zip(moments, m)]
                num_edges += batch.num_edges
            preds.append(pred.double().cpu().numpy())
            heavy.append(
                torch.zeros(g_count, dtype=torch.long)
                .index_add(0, batch.atom_graph.cpu(), (batch.atomic_numbers.cpu() > 1).long())
                .numpy()
            )
            num_atoms += int(batch.atomic_numbers.numel())
    finally:
        for p, flag in zip(model.parameters, flags):
            p.requires_grad_(flag)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    indices = np.asarray(indices, dtype=np.int64)
    return SplitPass(
        indices=indices,
        orders=orders,
        prediction=cat(preds),
        target=mols.properties[target][indices] if target is not None else None,
        heavy_atoms=cat(heavy),
        graph_invariants=[{l: (np.concatenate(v[l]) if v[l] else np.zeros((len(indices), 0))) for l in orders} for v in inv],
        node_sq=node_sq,
        graph_sq=graph_sq,
        node_sq_total=node_sq_total,
        graph_sq_total=graph_sq_total,
        num_atoms=num_atoms,
        grad_x_input=gxi if gradients else None,
        ablation_prediction=np.concatenate(abl, axis=2) if abl else None,
        path_moment=moments or [],
        num_edges=num_edges,
    )
