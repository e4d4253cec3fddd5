"""Fast, exact replacement for e3nn's ``FullyConnectedTensorProduct`` with edge harmonics.

The reference model computes, on every edge ``e`` (sender features ``x``, unit edge
direction ``r``, per-edge weights ``w = fc(radial)`` from the radial MLP)::

    out_l3[w, k] = sum over paths p = (l1, l2, l3) and copies u of
                   path_weight_p * w[e, p, u, w] * sum_ij C^{l1 l2 l3}_ijk x_l1[u, i] Y_l2(r)[j]

with ``C`` e3nn's real Wigner 3j symbols. This module computes exactly the same numbers
(to rounding: 1e-14 in float64, 1e-6 in float32), with its gradients, much faster.

What is differentiable
----------------------
Both entry points of :class:`FastTensorProduct` are differentiable in every tensor
argument: the features ``x``, the edge vectors (``EdgeFrame.vec``), and the per-edge
``weights`` or else ``radial`` and the parameters of ``fc``. Autograd can differentiate
them again: gradients taken with ``create_graph=True`` (forces ``-dE/dpos`` for training
on forces, then their gradient w.r.t. the parameters; Hessian-vector products) are
themselves differentiable, to any order, being ordinary torch operations (only the first
order uses the hand-written fast backward of :class:`_OuterMatmul`). First and second
derivatives equal e3nn's to rounding (1e-10 relative in float64) in every one of these
arguments, for edges along and next to the pole axis too (``tests/test_fast_tp.py``,
``tests/test_fast_tp_double.py``, which includes gradgradcheck; third derivatives were
checked once by hand, 1e-13). The one exception is a zero-length edge (``vec = 0``, no
direction, which no pair of distinct atoms has): the fast product treats it as pointing
along ``y`` (angles 0, zero gradient), e3nn's harmonics of it are zero for l > 0, so
even the values differ there.

What e3nn spends its time on (torch.profiler, this 2-core CPU, 32 QM9-like molecules,
~1150 directed edges, one AdamW training step of the 5-block model)
--------------------------------------------------------------------------------------
* [0..6]/H=16 (106 paths per block, 27,136 weights per edge): 18-37 s per step. 64 % of
  the CPU time is the backward of e3nn slicing the flat weight tensor per path
  (``SliceBackward0``): each of the 106 slices ``w[:, a:b]`` allocates and zero-fills a
  full ``[E, weight_numel]`` gradient (125 MB) and adds it up, so the cost grows as
  paths^2 (``fill_`` 40 %, ``add_`` 10 %, 50 GB allocated per step). The contractions
  themselves (``mm``/``bmm`` of the einsums) are about 20 %.
* [0,1,2]/H=32 (11 paths): 0.9-1.4 s per step; same picture, ``fill_`` 47 % and
  ``SliceBackward0`` 72 % in all, ``mm`` 15 %, ``bmm`` 7 %.
* Underneath: the radial MLP's last layer materialises ``[E, weight_numel]`` per-edge
  weights (52 MB per block at [0,1,2]/32, 125 MB at [0..6]/16), above glibc's mmap
  threshold, so every such tensor also costs fresh page faults; each weight is then
  used for only a handful of multiply-adds in small batched contractions.

The math
--------
1. *Rotate every edge onto the pole.* e3nn's pole is ``y``: ``Y_l(y_hat)`` is zero but
   for its middle (m = 0) component ``c_l``. With ``alpha = atan2(x, z)``,
   ``beta = atan2(sqrt(x^2 + z^2), y)`` and ``R = R(alpha, beta, 0)`` (``R y_hat = r``),
   ``Y(r) = D(R) Y(y_hat)``, and by equivariance of ``C``::

       TP(x, Y(r)) = D_out(R) TP(D_in(R)^T x, Y(y_hat)).

2. *In the rotated frame the product is diagonal in m.* Contracting ``C^{l1 l2 l3}`` with
   ``c_l2 e_0`` couples input component m only to output component m (every path here
   has ``l1 + l2 + l3`` even), with the same coefficient
   ``k_p(|m|) = path_weight_p * c_l2 * C[l1 + m, l2, l3 + m]`` for +m and -m (checked at
   construction from e3nn's own ``wigner_3j``, ``path_weight`` and harmonics, so every
   normalisation matches e3nn). Per |m| =: mu, the rotated output is a matrix product
   over (input order, copy) -> (output order, copy)::

       z_mu[e, +-, (b, w)] = sum_(a, u) x'_mu[e, +-, (a, u)] * W_mu[e, (a, u), (b, w)],
       W_mu[e] = sum_(p = (a, l2, b)) k_p(mu) w[e, p]     (paths with min(l_a, l_b) >= mu).

3. *Fold the radial MLP's last layer into the product.* ``w[e] = h[e] @ L`` with
   ``h = fc[:-1](radial)`` (``[E, K]``, K = 16 or 32) and ``L`` the last layer's (scaled)
   weight. So ``W_mu[e] = sum_k h[e, k] G_mu[k]`` with ``G_mu = sum_p k_p(mu) L[:, p]``,
   a small tensor built once per forward, shared by all edges, and::

       z_mu = (h (x) x'_mu) @ G_mu        # [E * rows, K * J] @ [K * J, N]

   one dense GEMM per level mu (``J = mul_in * n_in``, ``N = mul_out * n_out``); the
   ``[E, weight_numel]`` weights are never built. The outer product ``h (x) x'`` is
   rebuilt in backward instead of stored (:class:`_OuterMatmul`).

4. *Rotations cheaply.* ``D(alpha, beta, 0) = D_y(alpha) D_x(beta)`` and
   ``D_x(beta) = J D_y(beta) J^T`` with a constant ``J_l = D_l(R0)``, ``R0 y_hat = x_hat``
   (eSCN, Passaro & Zitnick 2023). ``D_y`` only mixes +m and -m with
   ``cos(m angle)``, ``sin(m angle)``: an elementwise operation. So
   ``D^T x = J D_y(-beta) J^T D_y(-alpha) x``: two elementwise rotations and two GEMMs
   ``[E * mul, D] @ [D, D]`` with block-diagonal constant matrices (D = sum of 2l+1), the
   first of which also emits the m <-> -m flipped columns the next rotation needs, and
   the second of which also reorders the columns by |m| for the per-level GEMMs. Angles
   come from ``atan2`` (``acos(y)`` loses half the digits near the poles), in float64.

5. *Away from the poles.* The Euler angles are singular at +-y: ``alpha`` is undefined
   there and ``d alpha / d r ~ 1 / sin(beta)`` next to it, so derivatives w.r.t. the edge
   vector would lose ``eps / sin(beta)`` (first order) and ``eps / sin(beta)^2`` (second
   order), and be plain wrong exactly on the axis. When the edge vectors require grad,
   edges within 19.5 degrees of +-y (``sin(beta) < 1/3``, ~6 % of random directions,
   ~12 % of QM9's bonds) are therefore first turned by the constant ``R0``
   (``R0 r = (y, -x, z)``, at least 70 degrees from the pole):
   ``R = R0^T R(alpha', beta', 0)`` with the angles of ``R0 r``, i.e. ``x -> D(R0) x``
   before the rotations and ``D(R0)^T`` after them, one small GEMM each on those edges
   only (``D(R0) = J``). This costs two row gathers and copies per product, 1-3 % of a
   training step, so it is skipped when nothing is differentiated w.r.t. the edge
   vectors (training on energies): the values do not depend on it.

Why this design
---------------
* Work: per edge and block, the level GEMMs cost
  ``K * mul^2 * sum_(a, b) (2 min(l_a, l_b) + 1)`` multiply-adds, 1.7x ([0,1,2]) to 2.2x
  ([0..6]) the FLOPs of e3nn's radial-MLP output layer alone, but as a few large dense
  GEMMs with weights shared by all edges, which run at 130-200 GFLOP/s on the 2 cores,
  instead of ~100 small, memory-bound contractions with per-edge weights. Backward has
  the same shape (two more GEMMs per level) and no per-path slicing. In a training step
  of the fast model the GEMMs are 55-65 % of the CPU time; the rest is rotations,
  gathers and outer products.
* Memory: nothing of size ``[E, weight_numel]`` exists, and autograd keeps only ``h``,
  the rotated features and the small ``G`` per level: peak memory is 10-20 % of e3nn's
  (``benchmarks/tensor_product.py``).
* Alternatives: the drop-in per-edge path (``forward(x, frame, weights)``: the same
  rotations, then one batched ``[(2t+1) x mul] @ [mul x mul]`` product per (edge, path),
  t = min(l1, l3)) is exact too and kept for generality, but it needs the
  ``[E, weight_numel]`` weights; in the full model it trains at ~110 mol/s for
  [0,1,2]/32 and ~17 mol/s for [0..6]/16, against ~140 and ~90 for the folded path
  (e3nn: ~30 and ~2). Materialising per-edge ``W_mu`` (contracting ``h`` first) would
  cut the FLOPs of the m != 0 levels by up to ~45 %, but makes them memory-bound work as
  large as e3nn's weights; not pursued. torch.compile was not tried: the hot path is
  already a few large GEMMs per block.
* Plain torch operations only (GEMM, elementwise, index_select, a custom autograd
  Function built from them), so the same code runs on CUDA; constants are cached per
  (dtype, device); the module has no parameters or buffers, so a model's ``state_dict``
  is the same under both backends.
* Exactness: constants come from e3nn in float64 whatever the default dtype. Note that
  e3nn builds its own Clebsch-Gordan buffers in the *default* dtype: an e3nn model built
  in float32 and cast to float64 is only float32-accurate (~1e-7), so comparisons at
  1e-10 need the e3nn model built with float64 as the default dtype (see the tests).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from e3nn import o3

__all__ = ["EdgeFrame", "FastTensorProduct"]


# ---------------------------------------------------------------------------------------
# Constants taken from e3nn, in float64
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _float64_default():
    """e3nn builds some constants (generators, Wigner matrices) in the default dtype: make it float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def pole_value(l: int, normalization: str) -> float:
    """The only non-zero (middle, m = 0) component of ``Y_l(y_hat)`` in e3nn's convention."""
    y_hat = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    with _float64_default():
        sh = o3.spherical_harmonics(l, y_hat, normalize=True, normalization=normalization)
    return float(sh[l])


def _wigner_3j(l1: int, l2: int, l3: int) -> torch.Tensor:
    with _float64_default():
        return o3.wigner_3j(l1, l2, l3, dtype=torch.float64)


def _y_to_x_matrix(l: int) -> torch.Tensor:
    """``J_l = D_l(R0)`` with ``R0 y_hat = x_hat`` (a -90 degree turn about z): ``D_x(b) = J D_y(b) J^T``."""
    r0 = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    with _float64_default():
        return o3.Irrep(l, 1).D_from_matrix(r0).to(torch.float64)


def _block_diag(ls: list[int]) -> torch.Tensor:
    return torch.block_diag(*[_y_to_x_matrix(l) for l in ls])


# ---------------------------------------------------------------------------------------
# Per-edge frame: the rotation that takes the pole axis (y) onto each edge direction
# ---------------------------------------------------------------------------------------


class EdgeFrame:
    """Euler angles of each edge direction, ``r_hat = R(alpha, beta, 0) y_hat``, and their multiples.

    ``alpha = atan2(x, z)`` and ``beta = atan2(sqrt(x^2 + z^2), y)`` (e3nn's
    ``xyz_to_angles``, but with ``atan2`` for ``beta``: ``acos(y)`` loses half the digits
    near the poles), computed in float64. The angles are singular at the poles ``+-y``
    (``d alpha / d r ~ 1 / sin(beta)``), so when ``vec`` requires grad, edges within
    ``asin(1/3)`` (19.5 degrees) of ``+-y`` (``turned``) use the angles of
    ``R0 r = (y, -x, z)`` instead, which is at least 70 degrees from the pole; the products
    apply the constant ``D(R0)`` to those edges (``R = R0^T R(alpha, beta, 0)``). Every
    edge's angles are thus well conditioned and the products are smooth in ``vec`` to every
    order, except at ``vec = 0`` (treated as along ``y``: angles 0, zero gradient). Values
    are the same either way (to rounding); when ``vec`` does not require grad nothing is
    turned (it would cost 1-3 % of a training step) and edges exactly along ``+-y`` get
    ``alpha = 0``. ``vec`` need not be normalised. One frame serves every block of a forward pass: the per-column
    ``cos(m angle)``, ``sin(m angle)`` tables are cached per column layout.
    ``normalization`` is that of the harmonics the frame stands for (the products check it).
    """

    def __init__(self, vec: torch.Tensor, lmax: int, normalization: str = "integral") -> None:
        if vec.ndim != 2 or vec.shape[1] != 3:
            raise ValueError(f"edge vectors must have shape [E, 3], got {tuple(vec.shape)}")
        self.vec = vec
        self.lmax = int(lmax)
        self.normalization = normalization
        work = vec if vec.device.type == "mps" else vec.to(torch.float64)  # tiny; m * alpha needs the digits
        x, y, z = work.unbind(-1)
        if vec.requires_grad:  # only derivatives w.r.t. vec need it: no cost when training on energies
            turned = 8 * (x * x + z * z) < y * y  # sin(beta) < 1/3
            x, y = torch.where(turned, y, x), torch.where(turned, -x, y)  # R0 r
            self.turned = turned.nonzero().squeeze(1)  # edges whose frame is R0^T R(alpha, beta, 0)
        else:
            self.turned = torch.zeros(0, dtype=torch.long, device=vec.device)
        rho2 = x * x + z * z
        on_pole = rho2 == 0  # on the pole axis (or vec = 0 if vec requires grad)
        zero, one = torch.zeros_like(rho2), torch.ones_like(rho2)
        self.alpha = torch.atan2(torch.where(on_pole, zero, x), torch.where(on_pole, one, z))
        self.beta = torch.atan2(torch.where(on_pole, zero, torch.sqrt(torch.where(on_pole, one, rho2))), y)
        self._tables: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}

    @property
    def num_edges(self) -> int:
        return self.vec.shape[0]

    def tables(self, ms: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``cos(m alpha), sin(m alpha), cos(m beta), sin(m beta)`` for the signed m of each column, 4 x [E, 1, D]."""
        if ms not in self._tables:
            m = torch.tensor(ms, dtype=self.alpha.dtype, device=self.alpha.device)
            a, b = self.alpha[:, None] * m, self.beta[:, None] * m
            self._tables[ms] = tuple(
                t.to(self.vec.dtype).unsqueeze(1) for t in (torch.cos(a), torch.sin(a), torch.cos(b), torch.sin(b))
            )
        return self._tables[ms]


# ---------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------


class _Layout:
    """Column bookkeeping for one side (input or output) of the product.

    Features are handled as ``[E, mul, D]`` with ``D = sum(2l+1)`` over the irreps entries.
    *Entry-major* columns are ``(entry, m)`` as in e3nn (``offsets[i] + l_i + m``);
    *m-major* columns are grouped by level ``mu = |m|``: ``m = 0`` of every entry, then
    ``m = +1`` of every entry with ``l >= 1``, then ``m = -1`` of those, and so on.
    """

    def __init__(self, irreps: o3.Irreps) -> None:
        self.ls = [ir.l for _, ir in irreps]
        self.mul = irreps[0].mul
        self.dim = sum(2 * l + 1 for l in self.ls)
        self.lmax = max(self.ls)
        self.offsets = [sum(2 * k + 1 for k in self.ls[:i]) for i in range(len(self.ls))]
        self.ms = tuple(m for l in self.ls for m in range(-l, l + 1))  # signed m of each entry-major column
        self.flip = [off + l - m for off, l in zip(self.offsets, self.ls) for m in range(-l, l + 1)]  # m -> -m
        self.m_major, self.level_start = [], []  # m-major position -> entry-major column
        for mu in range(self.lmax + 1):
            self.level_start.append(len(self.m_major))
            for sign in (0,) if mu == 0 else (1, -1):
                self.m_major += [self.offsets[i] + self.ls[i] + sign * mu for i in self.entries_at(mu)]
        # e3nn's layout (entry, copy u, m) <-> ours (copy u, entry, m), as flat column indices
        starts = [sl.start for sl in irreps.slices()]

        def e3nn_columns(flip: bool) -> list[int]:
            return [
                starts[i] + u * (2 * l + 1) + ((self.flip[c] if flip else c) - off)
                for u in range(self.mul)
                for i, (l, off) in enumerate(zip(self.ls, self.offsets))
                for c in range(off, off + 2 * l + 1)
            ]

        self.from_e3nn, self.from_e3nn_flipped = e3nn_columns(False), e3nn_columns(True)
        self.to_e3nn = [0] * len(self.from_e3nn)
        for ours, theirs in enumerate(self.from_e3nn):
            self.to_e3nn[theirs] = ours

    def entries_at(self, mu: int) -> list[int]:
        return [i for i, l in enumerate(self.ls) if l >= mu]


@dataclass
class _Path:
    """One weighted path of the product and its coupling in the rotated frame."""

    index: int  # position among the product's paths (its block of the flat weights)
    i_in: int  # input entry
    i_out: int  # output entry
    t: int  # min(l1, l3): the path couples m = -t..t
    coef: list[float]  # coupling of m -> m for m = -t..t (symmetric in m)


@dataclass
class _Level:
    """One |m| level of the folded product."""

    mu: int
    mult: int  # 1 for m = 0, else 2 (rows +mu and -mu share the coupling)
    in_start: int  # first m-major input column of the level
    n_in: int  # input entries with l >= mu
    n_out: int  # output entries with l >= mu
    q_start: int  # first row of the level in the folded coupling tensor
    active: bool  # some path couples at this level


# ---------------------------------------------------------------------------------------
# The tensor product
# ---------------------------------------------------------------------------------------


class FastTensorProduct(torch.nn.Module):
    """Exact, faster ``tp(x, Y(edge), weights)`` for an e3nn ``FullyConnectedTensorProduct``.

    ``tp`` must have weighted ``uvw`` paths with per-sample weights (``shared_weights=False``),
    one copy of each irrep in its second input (the edge harmonics, with the normalisation
    of the :class:`EdgeFrame` given at call time), one multiplicity for all entries of its
    first input and one for all of its output, and only paths with ``l1 + l2 + l3`` even
    (true whenever every order carries parity ``(-1)**l``). Others raise
    ``NotImplementedError``.

    The module has no parameters and no buffers: its constants live in a per-(dtype,
    device) cache, so a model's ``state_dict`` does not depend on the backend, and inputs of
    any float dtype and device work.

    Two entry points, both differentiable in every tensor argument, to any order (see
    "What is differentiable" in the module docstring):

    * ``forward(x, frame, weights)``: per-edge ``weights [E, tp.weight_numel]`` in e3nn's
      layout, a drop-in replacement for ``tp(x, sh, weights)``;
    * ``forward(x, frame, radial=radial, fc=fc)``: the weights are ``fc(radial)`` for an
      e3nn ``FullyConnectedNet`` without output activation; its last layer is folded into
      the product and the per-edge weights are never built (the fast path; see the module
      docstring).
    """

    def __init__(self, tp: o3.TensorProduct, sh_normalization: str = "integral") -> None:
        super().__init__()
        irreps_in, irreps_sh, irreps_out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
        if getattr(tp, "shared_weights", False) or getattr(tp, "internal_weights", False):
            raise NotImplementedError("FastTensorProduct needs a tensor product with per-sample weights")
        for name, irreps in (("first input", irreps_in), ("output", irreps_out)):
            if len(irreps) == 0 or len({mul for mul, _ in irreps}) != 1 or irreps[0].mul == 0:
                raise NotImplementedError(f"FastTensorProduct needs one non-zero multiplicity in the {name}, got {irreps}")
        if any(mul != 1 for mul, _ in irreps_sh):
            raise NotImplementedError(f"FastTensorProduct needs one copy of each harmonic, got {irreps_sh}")
        self.irreps_in, self.irreps_sh, self.irreps_out = irreps_in, irreps_sh, irreps_out
        self.sh_normalization = sh_normalization
        self.weight_numel = tp.weight_numel
        self.lin, self.lout = _Layout(irreps_in), _Layout(irreps_out)
        self.mul_in, self.mul_out = self.lin.mul, self.lout.mul
        self.paths = self._read_paths(tp)
        self.num_paths = len(self.paths)
        self._plan_levels()
        self._tmax = max((p.t for p in self.paths), default=0)
        self._cache: dict[tuple[torch.dtype, torch.device], dict[str, torch.Tensor]] = {}

    # -- construction ------------------------------------------------------------------

    def _read_paths(self, tp: o3.TensorProduct) -> list[_Path]:
        """The paths in weight order, with ``path_weight * Y_l2(y_hat)[0] * C[l1 + m, l2, l3 + m]``."""
        paths, offset = [], 0
        for ins in tp.instructions:
            numel = math.prod(ins.path_shape)
            if numel == 0:
                continue
            if ins.connection_mode != "uvw" or not ins.has_weight:
                raise NotImplementedError(f"FastTensorProduct supports weighted 'uvw' paths only, got {ins}")
            l1, l2, l3 = self.lin.ls[ins.i_in1], self.irreps_sh[ins.i_in2].ir.l, self.lout.ls[ins.i_out]
            if (l1 + l2 + l3) % 2:
                raise NotImplementedError(f"path {(l1, l2, l3)}: odd l1 + l2 + l3 (harmonics must have parity (-1)^l)")
            middle = _wigner_3j(l1, l2, l3)[:, l2, :]  # contraction with Y_l2(y_hat) = c e_0
            t = min(l1, l3)
            coef = [float(middle[l1 + m, l3 + m]) for m in range(-t, t + 1)]
            off_diagonal = middle.clone()
            for m in range(-t, t + 1):
                off_diagonal[l1 + m, l3 + m] = 0
            if off_diagonal.abs().max() > 1e-12 or max(abs(a - b) for a, b in zip(coef, coef[::-1])) > 1e-12:
                raise NotImplementedError(f"unexpected coupling structure for path {(l1, l2, l3)}")
            scale = ins.path_weight * pole_value(l2, self.sh_normalization)
            paths.append(_Path(len(paths), ins.i_in1, ins.i_out, t, [scale * v for v in coef]))
            offset += numel
        if offset != tp.weight_numel:
            raise NotImplementedError("unexpected weight layout")
        return paths

    def _plan_levels(self) -> None:
        """Folded product: per level mu, the sparse map from paths to (input entry, output entry) rows."""
        lin, lout = self.lin, self.lout
        self._nonzeros: list[tuple[int, int, float]] = []  # (path, folded row, coefficient)
        self.levels, q = [], 0
        for mu in range(min(lin.lmax, lout.lmax) + 1):
            ins_at, outs_at = lin.entries_at(mu), lout.entries_at(mu)
            active = False
            for p in self.paths:
                if p.t >= mu and p.coef[p.t + mu] != 0:
                    row = q + ins_at.index(p.i_in) * len(outs_at) + outs_at.index(p.i_out)
                    self._nonzeros.append((p.index, row, p.coef[p.t + mu]))
                    active = True
            mult = 1 if mu == 0 else 2
            self.levels.append(_Level(mu, mult, lin.level_start[mu], len(ins_at), len(outs_at), q, active))
            q += len(ins_at) * len(outs_at)
        self.num_folded = q

    def _padded_columns(self, layout: _Layout, side: str) -> list[int]:
        """Per path, its entry's columns m = -tmax..tmax where |m| <= t, else the padding row ``layout.dim``."""
        cols = []
        for p in self.paths:
            entry = getattr(p, side)
            base = layout.offsets[entry] + layout.ls[entry]
            cols += [base + m if abs(m) <= p.t else layout.dim for m in range(-self._tmax, self._tmax + 1)]
        return cols

    def _constants(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        key = (dtype, device)
        if key not in self._cache:
            lin, lout = self.lin, self.lout
            f, i = dict(dtype=dtype, device=device), dict(dtype=torch.long, device=device)
            j_in, j_out = _block_diag(lin.ls), _block_diag(lout.ls)
            j_in_m, j_out_m = j_in.T[:, lin.m_major], j_out[lout.m_major, :]
            paths, rows, values = zip(*self._nonzeros) if self._nonzeros else ((), (), ())
            c = {
                # x' = J Dy(-b) J^T Dy(-a) x and y = Dy(a) J Dy(b) J^T z as right-multiplications
                # of [rows, D] blocks; every matrix that feeds a y-rotation also emits the m -> -m
                # flipped columns, so the rotations need no gather. "_m": m-major columns.
                "in_gather": torch.tensor(lin.from_e3nn + lin.from_e3nn_flipped, **i),
                "in_first": torch.cat([j_in, j_in[:, lin.flip]], dim=1).to(**f),
                "in_second": j_in.T.contiguous().to(**f),
                "in_second_m": j_in_m.contiguous().to(**f),
                "out_first": torch.cat([j_out, j_out[:, lout.flip]], dim=1).to(**f),
                "out_first_m": torch.cat([j_out_m, j_out_m[:, lout.flip]], dim=1).to(**f),
                "out_second": torch.cat([j_out.T, j_out.T[:, lout.flip]], dim=1).to(**f),
                "out_scatter": torch.tensor(lout.to_e3nn, **i),
                # edges near the pole: x -> D(R0) x (and flipped) before, y -> D(R0)^T y after
                "in_turn": torch.cat([j_in.T, j_in.T[:, lin.flip]], dim=1).to(**f),
                "out_turn": j_out.to(**f),
                # folded product
                "fold_path": torch.tensor(paths, **i),
                "fold_row": torch.tensor(rows, **i),
                "fold_value": torch.tensor(values, **f),
                # per-edge product: every path's central 2t+1 columns, padded to 2 tmax + 1
                "path_in": torch.tensor(self._padded_columns(lin, "i_in"), **i),
                "path_out": torch.tensor(self._padded_columns(lout, "i_out"), **i),
                "path_coef": torch.tensor(
                    [[0.0] * (self._tmax - p.t) + p.coef + [0.0] * (self._tmax - p.t) for p in self.paths], **f
                ).view(self.num_paths, 2 * self._tmax + 1, 1),
            }
            self._cache[key] = c
        return self._cache[key]

    # -- the product -------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        frame: EdgeFrame,
        weights: torch.Tensor | None = None,
        *,
        radial: torch.Tensor | None = None,
        fc: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """``tp(x, Y(frame.vec), weights)`` (or ``weights = fc(radial)``) as ``[E, irreps_out.dim]``."""
        if frame.normalization != self.sh_normalization:
            raise ValueError(f"frame has {frame.normalization!r} harmonics, the product expects {self.sh_normalization!r}")
        if frame.lmax < max(self.lin.lmax, self.lout.lmax):
            raise ValueError(f"frame lmax {frame.lmax} is below the product's orders")
        if x.ndim != 2 or x.shape[1] != self.irreps_in.dim or x.shape[0] != frame.num_edges:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [{frame.num_edges}, {self.irreps_in.dim}]")
        c = self._constants(x.dtype, x.device)
        if weights is not None:
            if radial is not None or fc is not None:
                raise ValueError("pass either weights or radial and fc, not both")
            z = self._couple_per_edge(self._rotate_in(x, frame, c, m_major=False), weights, c)
            return self._rotate_out(z, frame, c, m_major=False)
        if radial is None or fc is None:
            raise ValueError("pass weights, or radial and fc")
        hidden, last = split_radial_mlp(fc, radial)
        z = self._couple_folded(self._rotate_in(x, frame, c, m_major=True), hidden.to(x.dtype), last.to(x.dtype), c)
        return self._rotate_out(z, frame, c, m_major=True)

    def _rotate_in(self, x: torch.Tensor, frame: EdgeFrame, c, m_major: bool) -> torch.Tensor:
        """e3nn layout ``[E, dim]`` -> rotated frame ``[E, mul, D]`` (m-major or entry-major columns)."""
        E, mul, D = x.shape[0], self.mul_in, self.lin.dim
        if self.lin.lmax == 0:  # scalars do not rotate
            return x.reshape(E, mul, D)
        ca, sa, cb, sb = frame.tables(self.lin.ms)
        v = x.index_select(1, c["in_gather"]).view(E, 2, mul, D)  # columns m and -m, in our layout
        turned = frame.turned
        if turned.numel():  # D(R0) first on edges near the pole, then as for every edge
            near = (v[turned, 0].reshape(-1, D) @ c["in_turn"]).view(-1, mul, 2, D).transpose(1, 2)
            v = v.index_copy(0, turned, near)
        v = v[:, 0] * ca + v[:, 1] * sa  # Dy(-alpha)
        v = (v.view(E * mul, D) @ c["in_first"]).view(E, mul, 2, D)  # J^T, and flipped
        v = v[:, :, 0] * cb + v[:, :, 1] * sb  # Dy(-beta)
        return (v.view(E * mul, D) @ c["in_second_m" if m_major else "in_second"]).view(E, mul, D)  # J

    def _rotate_out(self, z: torch.Tensor, frame: EdgeFrame, c, m_major: bool) -> torch.Tensor:
        """Rotated frame ``[E, mul, D]`` (m-major or entry-major columns) -> e3nn layout ``[E, dim]``."""
        E, mul, D = z.shape[0], self.mul_out, self.lout.dim
        if self.lout.lmax == 0:
            return z.reshape(E, mul * D)
        ca, sa, cb, sb = frame.tables(self.lout.ms)
        v = (z.reshape(E * mul, D) @ c["out_first_m" if m_major else "out_first"]).view(E, mul, 2, D)  # J^T
        v = v[:, :, 0] * cb - v[:, :, 1] * sb  # Dy(beta)
        v = (v.view(E * mul, D) @ c["out_second"]).view(E, mul, 2, D)  # J
        v = v[:, :, 0] * ca - v[:, :, 1] * sa  # Dy(alpha)
        turned = frame.turned
        if turned.numel():  # D(R0)^T last on edges near the pole
            v = v.index_copy(0, turned, (v[turned].reshape(-1, D) @ c["out_turn"]).view(-1, mul, D))
        return v.reshape(E, mul * D).index_select(1, c["out_scatter"])

    def _couple_folded(self, xr: torch.Tensor, hidden: torch.Tensor, last: torch.Tensor, c) -> torch.Tensor:
        """Rotated frame, weights ``hidden @ last``: per level, ``(hidden (x) x_level) @ G_level``."""
        K = hidden.shape[1]
        per_path = last.view(K, self.num_paths, self.mul_in, self.mul_out)
        picked = per_path.index_select(1, c["fold_path"]) * c["fold_value"].view(1, -1, 1, 1)
        folded = per_path.new_zeros(K, self.num_folded, self.mul_in, self.mul_out).index_add(1, c["fold_row"], picked)
        outs = []
        for lv in self.levels:
            if not lv.active:
                outs.append(None)
                continue
            g = folded[:, lv.q_start : lv.q_start + lv.n_in * lv.n_out]
            g = g.view(K, lv.n_in, lv.n_out, self.mul_in, self.mul_out).permute(0, 3, 1, 4, 2)
            g = g.reshape(K * self.mul_in * lv.n_in, self.mul_out * lv.n_out)  # rows (k, u, a), columns (w, b)
            cols = xr[:, :, lv.in_start : lv.in_start + lv.mult * lv.n_in].reshape(-1, self.mul_in, lv.mult, lv.n_in)
            x_level = cols.transpose(1, 2).reshape(-1, lv.mult, self.mul_in * lv.n_in)  # rows +-mu, columns (u, a)
            outs.append(_OuterMatmul.apply(hidden, x_level, g))
        return self._assemble(outs, xr)

    def _assemble(self, outs: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """Per-level outputs ``[E, mult, (w, b)]`` -> m-major ``[E, mul_out, D_out]`` (zeros where no path)."""
        E, mul, parts = like.shape[0], self.mul_out, []
        for mu in range(self.lout.lmax + 1):
            mult, n = (1 if mu == 0 else 2), len(self.lout.entries_at(mu))
            out = outs[mu] if mu < len(outs) else None
            if out is None:
                parts.append(like.new_zeros(E, mul, mult * n))
            else:
                parts.append(out.view(E, mult, mul, n).transpose(1, 2).reshape(E, mul, mult * n))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _couple_per_edge(self, xr: torch.Tensor, weights: torch.Tensor, c) -> torch.Tensor:
        """Rotated frame, per-edge weights, entry-major columns: one batched
        ``[(2t+1) x mul_in] @ [mul_in x mul_out]`` per (edge, path), t = min(l1, l3), the rows
        padded to the largest t so that the weights are used in place (copying them costs more)."""
        E, P, width = xr.shape[0], self.num_paths, 2 * self._tmax + 1
        if weights.shape != (E, self.weight_numel):
            raise ValueError(f"weights have shape {tuple(weights.shape)}, expected [{E}, {self.weight_numel}]")
        padded = torch.nn.functional.pad(xr, (0, 1)).transpose(1, 2)  # [E, D_in + 1, mul_in], last row zero
        y = padded.index_select(1, c["path_in"]).view(E, P, width, self.mul_in)
        out = torch.matmul(y, weights.view(E, P, self.mul_in, self.mul_out)) * c["path_coef"]  # [E, P, width, mul_out]
        z = xr.new_zeros(E, self.lout.dim + 1, self.mul_out)  # the last row collects the padding
        z = z.index_add(1, c["path_out"], out.view(E, P * width, self.mul_out))
        return z[:, :-1].transpose(1, 2)


class _OuterMatmul(torch.autograd.Function):
    """``out[e, s] = (h[e] (x) x[e, s]) @ g``: ``h [E, K]``, ``x [E, S, J]``, ``g [K*J, N]`` -> ``[E, S, N]``.

    The outer product ``T = h (x) x`` (``E*S x K*J``, the largest tensor of the product) is
    not kept for backward but rebuilt there, which saves memory and one pass over it; the
    gradients of ``h`` and ``x`` are batched mat-vecs against ``dT``.

    Twice differentiable: a plain backward (``create_graph=False``, autograd runs it with
    grad mode off) takes the fast path above; under ``create_graph=True`` (forces for
    training, Hessian-vector products) the same gradients are computed with ordinary
    differentiable torch operations, so autograd differentiates them again exactly. (Do
    not put back ``@once_differentiable``: with torch 2.13 a second differentiation
    through it does not raise "trying to differentiate twice", it silently drops this
    function's second-order terms: forces were right, their gradients wrong by 10-60 %.)
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, x, g)
        return (_outer(h, x) @ g).view(x.shape[0], x.shape[1], g.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, x, g = ctx.saved_tensors
        (E, S, J), K = x.shape, h.shape[1]
        grad_out = grad_out.reshape(E * S, g.shape[1])
        needs_h, needs_x, needs_g = ctx.needs_input_grad
        grad_h = grad_x = grad_g = None
        if torch.is_grad_enabled():  # create_graph=True: build a graph of the gradients (no out=, no in-place)
            if needs_g:
                grad_g = (h.reshape(E, 1, K, 1) * x.reshape(E, S, 1, J)).reshape(E * S, K * J).T @ grad_out
            if needs_h or needs_x:
                grad_t = (grad_out @ g.T).view(E, S, K, J)
                if needs_h:
                    grad_h = torch.matmul(grad_t.view(E * S, K, J), x.reshape(E * S, J, 1)).view(E, S, K).sum(1)
                if needs_x:
                    grad_x = torch.matmul(h.reshape(E, 1, 1, K), grad_t).view(E, S, J)
            return grad_h, grad_x, grad_g
        if needs_g:
            grad_g = _outer(h, x).T @ grad_out
        if needs_h or needs_x:
            grad_t = (grad_out @ g.T.contiguous()).view(E, S, K, J)
            if needs_h:
                grad_h = torch.matmul(grad_t.view(E * S, K, J), x.reshape(E * S, J, 1)).view(E, S, K).sum(1)
            if needs_x:
                grad_x = torch.matmul(h.view(E, 1, 1, K), grad_t).view(E, S, J)
        return grad_h, grad_x, grad_g


def _outer(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[E, K] (x) [E, S, J]`` -> ``[E*S, K*J]``; not differentiable (forward, first-order backward)."""
    (E, S, J), K = x.shape, h.shape[1]
    out = torch.empty(E, S, K, J, dtype=x.dtype, device=x.device)  # (no autograd in here: out= is fine)
    torch.mul(h.reshape(E, 1, K, 1), x.reshape(E, S, 1, J), out=out)
    return out.view(E * S, K * J)


def split_radial_mlp(fc: torch.nn.Module, radial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an e3nn ``FullyConnectedNet`` up to its last layer; return (hidden, scaled last weight)."""
    layers = list(fc.children())
    last = layers[-1]
    if getattr(last, "act", None) is not None or not hasattr(last, "weight"):
        raise NotImplementedError("the radial network's last layer must be linear (e3nn FullyConnectedNet, out_act=False)")
    hidden = radial
    for layer in layers[:-1]:
        hidden = layer(hidden)
    scale = (last.h_in * last.var_in / last.var_out) ** -0.5
    return hidden, last.weight * scale
