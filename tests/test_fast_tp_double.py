"""The fast tensor product is twice differentiable, exactly as e3nn: training on forces works.

Forces are ``-d energy / d pos`` with ``create_graph=True``; a loss on them is then
differentiated with respect to the parameters (and the positions), which runs the
product's backward under autograd (double backward). Compared with e3nn on the same
weights, in float64.
"""

from __future__ import annotations


import pytest
import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet

from helpers import assert_rel_close, default_dtype
from irrepscope.config import ModelConfig
from irrepscope.model.fast_tp import EdgeFrame, FastTensorProduct
from irrepscope.model.network import build_model
from irrepscope.orders import hidden_irreps, sh_irreps

TOL = 1e-10
MOLECULES = [1, 7, 100, 2000, 50000, 130000]  # NH3 .. nine heavy atoms; 130 edges, 20 near the pole axis


@pytest.fixture(scope="module")
def batches(request):
    """The same real QM9 molecules in float64 and float32."""
    try:
        qm9 = request.getfixturevalue("qm9")
        from irrepscope.data.batching import collate
    except Exception as exc:  # noqa: BLE001 - no data here: nothing to compare
        pytest.skip(f"QM9 not available: {exc}")
    return {dtype: collate(qm9, MOLECULES, target="U0_atomization", dtype=dtype) for dtype in (torch.float64, torch.float32)}


@pytest.fixture(scope="module")
def batch(batches):
    return batches[torch.float64]


def force_training_step(model, batch, backend):
    """Forces, and the gradients of a force loss w.r.t. every parameter and the positions."""
    model.set_backend(backend)
    model.zero_grad()
    pos = batch.pos.clone().requires_grad_(True)
    energy = model(type(batch)(**{**vars(batch), "pos": pos})).prediction.sum()
    (grad_pos,) = torch.autograd.grad(energy, pos, create_graph=True)
    forces = -grad_pos
    target = torch.linspace(-1, 1, forces.numel(), dtype=forces.dtype).view_as(forces)
    loss = ((forces - target) ** 2).sum() + 0.1 * energy  # an energy + forces objective, as in force training
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [pos, *params.values()], allow_unused=True)
    return forces.detach(), grads[0], dict(zip(params, grads[1:]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("orders", [[0, 1, 2], [0, 2, 3]], ids=str)
def test_force_training_gradients_match_e3nn(batches, orders, dtype):
    """Forces, the force loss's gradient w.r.t. every parameter, and w.r.t. the positions."""
    batch, tol = batches[dtype], {torch.float64: TOL, torch.float32: 1e-5}[dtype]
    vec = (batch.pos[batch.edge_src] - batch.pos[batch.edge_dst]).requires_grad_(True)
    assert 0 < EdgeFrame(vec, 1).turned.numel() < len(vec)  # edges in both frames (near the pole axis or not)
    torch.manual_seed(0)
    with default_dtype(dtype):
        model = build_model(ModelConfig(orders=orders, hidden_mul=3, num_blocks=2, backend="fast"))
    ref_forces, ref_hessian_vec, ref_grads = force_training_step(model, batch, "e3nn")
    forces, hessian_vec, grads = force_training_step(model, batch, "fast")
    assert forces.abs().max() > 0
    assert_rel_close(forces, ref_forces, tol, "forces")
    reached = 0
    for name, ref in ref_grads.items():
        assert grads[name] is not None and ref is not None, f"{name}: not reached by the loss"
        assert_rel_close(grads[name], ref, tol, f"grad of the force loss w.r.t. {name}")
        reached += "fc" in name and ref.abs().max() > 0
    assert reached >= 2 * 2, "the force loss should reach the radial MLPs of both blocks"
    assert_rel_close(hessian_vec, ref_hessian_vec, tol, "gradient of the force loss w.r.t. positions")


def test_first_order_backward_is_unchanged_by_double_backward(batch):
    """A plain backward gives bit-identical gradients before and after a double backward through the same model."""
    torch.manual_seed(1)
    with default_dtype(torch.float64):
        model = build_model(ModelConfig(orders=[0, 1, 2], hidden_mul=2, num_blocks=2, backend="fast"))
    model.zero_grad()
    model(batch).prediction.sum().backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    force_training_step(model, batch, "fast")
    model.zero_grad()
    model(batch).prediction.sum().backward()
    for n, g in first.items():
        assert torch.equal(model.get_parameter(n).grad, g), n


def test_turning_near_the_pole_changes_no_value(batch):
    """Edges near the pole axis get another frame only when positions are differentiated; same values."""
    torch.manual_seed(2)
    with default_dtype(torch.float64):
        model = build_model(ModelConfig(orders=[0, 1, 2, 3], hidden_mul=3, num_blocks=2, backend="fast"))
    plain = model(batch).prediction
    assert model.edge_geometry(batch).frame().turned.numel() == 0
    pos = batch.pos.clone().requires_grad_(True)
    moved = type(batch)(**{**vars(batch), "pos": pos})
    assert model.edge_geometry(moved).frame().turned.numel() > 0
    assert_rel_close(model(moved).prediction, plain, 1e-13, "prediction with and without turned frames")


# ---------------------------------------------------------------------------------------
# The bare product
# ---------------------------------------------------------------------------------------


def small_product(orders, mul, irreps_in=None):
    with default_dtype(torch.float64):
        tp = o3.FullyConnectedTensorProduct(
            irreps_in or hidden_irreps(orders, mul), sh_irreps(orders), hidden_irreps(orders, mul),
            shared_weights=False, internal_weights=False,
        )  # fmt: skip
        fc = FullyConnectedNet([3, 4, tp.weight_numel], torch.nn.functional.silu)
    return tp, fc, FastTensorProduct(tp)


# Edges along the pole (y) and next to it, where Euler angles are singular, and elsewhere.
AXES = [[0, 1, 0], [0, -2.5, 0], [1e-9, 1, 0], [0, -1, 1e-8], [1e-4, 1, -1e-4], [0.2, -1, 0.3], [1, 0, 0], [0, 0, -0.7]]


def random_inputs(tp, E, seed=0):
    """Random inputs for ``E`` edges; the first edges lie along the pole, then near it."""
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(E, 3, generator=g, dtype=torch.float64)
    vec[: min(E, len(AXES))] = torch.tensor(AXES[:E], dtype=torch.float64)
    x = torch.randn(E, tp.irreps_in1.dim, generator=g, dtype=torch.float64)
    radial = torch.randn(E, 3, generator=g, dtype=torch.float64)
    w = torch.randn(E, tp.weight_numel, generator=g, dtype=torch.float64)
    return vec, x, radial, w


@pytest.mark.parametrize("orders,mul", [([0, 1, 2], 2), ([0, 2, 3], 1)], ids=str)
def test_gradgradcheck_folded(orders, mul):
    """Folded radial MLP: second derivatives in x, the edge vectors, the radial features and every MLP weight."""
    tp, fc, fast = small_product(orders, mul)
    vec, x, radial, _ = random_inputs(tp, 4)
    names = [n for n, _ in fc.named_parameters()]

    def f(x, vec, radial, *weights):
        return _folded(fast, fc, dict(zip(names, weights)), x, EdgeFrame(vec, max(orders)), radial)

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x, vec, radial, *fc.parameters()))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def _folded(fast, fc, params, x, frame, radial):
    """``fast(x, frame, radial=radial, fc=fc)`` with ``fc``'s parameters replaced by ``params``."""

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = fc

        def forward(self, x, radial):
            return fast(x, frame, radial=radial, fc=self.fc)

    return torch.func.functional_call(Call(), {f"fc.{n}": p for n, p in params.items()}, (x, radial))


@pytest.mark.parametrize("orders,mul", [([0, 1, 2], 2), ([0, 2, 3], 1)], ids=str)
def test_gradgradcheck_per_edge_weights(orders, mul):
    tp, _, fast = small_product(orders, mul)
    vec, x, _, w = random_inputs(tp, 4, seed=1)

    def f(x, vec, w):
        return fast(x, EdgeFrame(vec, max(orders)), w)

    inputs = tuple(t.clone().requires_grad_(True) for t in (x, vec, w))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "per-edge-weights"])
def test_second_derivatives_match_e3nn(folded):
    """Gradients and Hessian-vector products of the bare product in x, the edge vectors (along and next
    to the pole included) and the weights equal e3nn's."""
    orders = [0, 1, 2, 3]
    tp, fc, fast = small_product(orders, 3)
    vec, x, radial, w = random_inputs(tp, 30, seed=2)
    inputs = [t.clone().requires_grad_(True) for t in (x, vec, radial, w)] + list(fc.parameters())
    x, vec, radial, w = inputs[:4]
    inputs = inputs[:3] + inputs[4:] if folded else inputs[:2] + inputs[3:4]
    sh = o3.spherical_harmonics(sh_irreps(orders), vec, normalize=True, normalization="integral")
    go = torch.randn(len(vec), tp.irreps_out.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    frame = EdgeFrame(vec, max(orders))
    results = []
    for out in (
        (tp(x, sh, fc(radial)), fast(x, frame, radial=radial, fc=fc))
        if folded
        else (tp(x, sh, w), fast(x, frame, w))
    ):
        first = torch.autograd.grad((out * go).sum(), inputs, create_graph=True)
        objective = sum((g * torch.cos(torch.arange(g.numel(), dtype=g.dtype)).view_as(g)).sum() for g in first)
        results.append((first, torch.autograd.grad(objective, inputs)))
    (ref_first, ref_second), (first, second) = results
    for k, (a, b) in enumerate(zip(first, ref_first)):
        assert_rel_close(a, b, TOL, f"first derivative {k}")
    for k, (a, b) in enumerate(zip(second, ref_second)):
        assert_rel_close(a, b, TOL, f"second derivative {k}")
