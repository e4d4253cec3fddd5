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

The gradient work (a backward pass, or a re-run per block and order) can be limited to a
subset of the molecules (``gradient_positions``: the analysis' ablation subset), the rest
getting the forward pass alone; every molecule's numbers are the same either way.
"""

from __future__ import annotations

import dataclasses
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
    # Per molecule, so that any subset or bootstrap resample is summed without a re-run:
    node_sq: np.ndarray  # [B, n_orders, M] sum over the molecule's atoms of the squared norm of each order block
    graph_sq: np.ndarray  # [B, n_orders, M] squared norm of the molecule's pooled order block
    # [B, M] the same over *all* of the model's orders, whatever ``orders`` holds: the
    # denominators of the norm shares, so that analysing a subset does not inflate them.
    node_sq_total: np.ndarray
    graph_sq_total: np.ndarray
    atoms: np.ndarray  # [M] atoms per molecule
    # With gradients only, on the molecules at ``gradient_positions`` (sorted positions in ``indices``; all by default):
    gradient_positions: np.ndarray | None = None  # [G]
    grad_x_input: np.ndarray | None = None  # [B, n_orders, G] sum over the molecule's atoms of sum_u |<g_u, x_u>|
    ablation_prediction: np.ndarray | None = None  # [B, n_orders, G] prediction with order zeroed at block b
    path_moment: list[np.ndarray] = field(default_factory=list)  # per block, what the family's path_weight_rms reads
    num_edges: int = 0  # the edges the path moments were summed over (all of the pass's)

    @property
    def num_atoms(self) -> int:
        return int(self.atoms.sum())


def collect(
    model: AnalysedModel,
    mols: Structures,
    indices: np.ndarray,
    *,
    target: str | None,
    orders: list[int] | None = None,
    batch_size: int = 256,
    gradients: bool = True,
    gradient_positions: np.ndarray | None = None,
    progress: Progress = _no_progress,
    desc: str = "features",
) -> SplitPass:
    """Run ``model`` over ``mols[indices]`` once and collect a :class:`SplitPass`.

    ``target``: the property whose values go with the pass (float64, from ``mols``).
    With ``gradients``, also the gradient of each molecule's prediction w.r.t. every
    block's output, the per-(block, order) ablation predictions and the path moments.
    ``gradient_positions`` (with ``gradients``): only the molecules at these positions of
    ``indices`` get the gradient measures, computed in batches of their own (the rest run
    forward only, after them); None: all of them. Every per-molecule array comes back in
    the order of ``indices`` whatever the batching.
    ``orders`` restricts the per-order measures; the squared norm of each whole block (all
    of its orders) is always summed too (``node_sq_total``/``graph_sq_total``).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if gradients and gradient_positions is not None:
        gpos = np.unique(np.asarray(gradient_positions, dtype=np.int64))
        if len(gpos) and (gpos[0] < 0 or gpos[-1] >= len(indices)):
            raise ValueError("gradient_positions must be positions in indices")
        rest = np.setdiff1d(np.arange(len(indices)), gpos)
        first = _collect(model, mols, indices[gpos], target, orders, batch_size, True, True, progress, desc)
        if len(rest) == 0:
            return first
        desc_rest = f"{desc} (rest: forward)"
        second = _collect(model, mols, indices[rest], target, orders, batch_size, False, True, progress, desc_rest)
        return _merge(first, second, gpos, rest)
    return _collect(model, mols, indices, target, orders, batch_size, gradients, gradients, progress, desc)


def _merge(grad: SplitPass, fwd: SplitPass, gpos: np.ndarray, rest: np.ndarray) -> SplitPass:
    """One pass in the original order from a pass with gradients (positions ``gpos``) and one without (``rest``)."""
    order = np.argsort(np.concatenate([gpos, rest]), kind="stable")  # concatenated -> original positions

    def cat(a: np.ndarray | None, b: np.ndarray | None, axis: int = 0) -> np.ndarray | None:
        return None if a is None else np.take(np.concatenate([a, b], axis=axis), order, axis=axis)

    moments = [a + b for a, b in zip(grad.path_moment, fwd.path_moment)] if grad.path_moment else fwd.path_moment
    return dataclasses.replace(
        grad,
        indices=cat(grad.indices, fwd.indices),
        prediction=cat(grad.prediction, fwd.prediction),
        target=cat(grad.target, fwd.target),
        heavy_atoms=cat(grad.heavy_atoms, fwd.heavy_atoms),
        graph_invariants=[{l: cat(g[l], f[l]) for l in g} for g, f in zip(grad.graph_invariants, fwd.graph_invariants)],
        node_sq=cat(grad.node_sq, fwd.node_sq, -1),
        graph_sq=cat(grad.graph_sq, fwd.graph_sq, -1),
        node_sq_total=cat(grad.node_sq_total, fwd.node_sq_total, -1),
        graph_sq_total=cat(grad.graph_sq_total, fwd.graph_sq_total, -1),
        atoms=cat(grad.atoms, fwd.atoms),
        gradient_positions=gpos,
        path_moment=moments,
        num_edges=grad.num_edges + fwd.num_edges,
    )


def _collect(
    model: AnalysedModel,
    mols: Structures,
    indices: np.ndarray,
    target: str | None,
    orders: list[int] | None,
    batch_size: int,
    gradients: bool,
    moments: bool,
    progress: Progress,
    desc: str,
) -> SplitPass:
    """:func:`collect` on one kind of batch: all with gradients or all without (path moments with ``moments``)."""
    orders = list(orders if orders is not None else model.orders)
    nb, no = model.num_blocks, len(orders)
    slices = [order_slices(irreps) for irreps in model.block_irreps]
    preds, heavy, atoms = [], [], []
    inv = [{l: [] for l in orders} for _ in range(nb)]
    sums: dict[str, list[np.ndarray]] = {"node_sq": [], "graph_sq": [], "node_sq_total": [], "graph_sq_total": [], "gxi": []}
    abl: list[np.ndarray] = []
    moment_sums: list[np.ndarray] | None = None
    num_edges = 0
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
            graph_of = batch.atom_graph

            def atom_sum(per_atom: torch.Tensor) -> torch.Tensor:  # [N] -> [G] float64 sums
                return torch.zeros(g_count, dtype=torch.float64, device=per_atom.device).index_add(0, graph_of, per_atom.double())

            abl_batch = np.zeros((nb, no, *pred.shape))
            b_sums = {k: torch.zeros(nb, no, g_count, dtype=torch.float64) for k in ("node_sq", "graph_sq", "gxi")}
            b_totals = {k: torch.zeros(nb, g_count, dtype=torch.float64) for k in ("node_sq_total", "graph_sq_total")}
            for b, (xb, gb) in enumerate(zip(xs, grads)):
                xb = xb.detach()
                irreps = model.block_irreps[b]
                pooled = torch.zeros(g_count, xb.shape[1], dtype=xb.dtype, device=xb.device).index_add(0, batch.atom_graph, xb)
                x_by = split_by_order(xb, irreps)
                p_by = split_by_order(pooled, irreps)
                g_by = [split_by_order(g, irreps) for g in gb] if gb is not None else None
                b_totals["node_sq_total"][b] = atom_sum((xb.double() ** 2).sum(1)).cpu()
                b_totals["graph_sq_total"][b] = (pooled.double() ** 2).sum(1).cpu()
                for j, l in enumerate(orders):
                    if l not in slices[b]:  # this block does not carry order l (e.g. a scalars-only last layer)
                        abl_batch[b, j] = pred.double().cpu().numpy()
                        continue
                    b_sums["node_sq"][b, j] = atom_sum((x_by[l].double() ** 2).sum((1, 2))).cpu()
                    b_sums["graph_sq"][b, j] = (p_by[l].double() ** 2).sum((1, 2)).cpu()
                    feats = p_by[l][..., 0] if l == 0 else invariant_norms(p_by[l])
                    inv[b][l].append(feats.double().cpu().numpy())
                    if g_by is not None:
                        # [N, H] per output component: <g_u, x_u> per copy
                        dots = [(g[l] * x_by[l]).sum(-1).double() for g in g_by]
                        # |<g, x>| per atom and copy; for a vector output the length over components (invariant)
                        b_sums["gxi"][b, j] = atom_sum(torch.linalg.vector_norm(torch.stack(dots), dim=0).sum(1)).cpu()
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
            if moments:
                m = model.path_moments(batch)
                if m is not None:
                    moment_sums = m if moment_sums is None else [a + c for a, c in zip(moment_sums, m)]
                num_edges += batch.num_edges
            preds.append(pred.double().cpu().numpy())
            heavy.append(
                torch.zeros(g_count, dtype=torch.long)
                .index_add(0, batch.atom_graph.cpu(), (batch.atomic_numbers.cpu() > 1).long())
                .numpy()
            )
            atoms.append(torch.bincount(batch.atom_graph.cpu(), minlength=g_count).numpy())
            for k, v in {**b_sums, **b_totals}.items():
                sums[k].append(v.numpy())
    finally:
        for p, flag in zip(model.parameters, flags):
            p.requires_grad_(flag)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    empty = {"node_sq_total": (nb, 0), "graph_sq_total": (nb, 0)}  # the rest are [B, n_orders, M]
    per_mol_sums = {k: np.concatenate(v, axis=-1) if v else np.zeros(empty.get(k, (nb, no, 0))) for k, v in sums.items()}
    return SplitPass(
        indices=indices,
        orders=orders,
        prediction=cat(preds),
        target=mols.properties[target][indices] if target is not None else None,
        heavy_atoms=cat(heavy),
        graph_invariants=[{l: (np.concatenate(v[l]) if v[l] else np.zeros((len(indices), 0))) for l in orders} for v in inv],
        node_sq=per_mol_sums["node_sq"],
        graph_sq=per_mol_sums["graph_sq"],
        node_sq_total=per_mol_sums["node_sq_total"],
        graph_sq_total=per_mol_sums["graph_sq_total"],
        atoms=cat(atoms).astype(np.int64),
        gradient_positions=np.arange(len(indices)) if gradients else None,
        grad_x_input=per_mol_sums["gxi"] if gradients else None,
        ablation_prediction=np.concatenate(abl, axis=2) if abl else (np.zeros((nb, no, 0)) if gradients else None),
        path_moment=moment_sums or [],
        num_edges=num_edges,
    )
