"""The fast tensor product equals e3nn's, in values and gradients, for single products and whole models."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet

from helpers import assert_rel_close, default_dtype
from irrepscope.config import ModelConfig
from irrepscope.data.batching import collate
from irrepscope.errors import IrrepscopeError
from irrepscope.model.fast_tp import EdgeFrame, FastTensorProduct
from irrepscope.model.network import build_model
from irrepscope.orders import hidden_irreps, sh_irreps

# Edges along the axes are where Euler angles degenerate (the pole is y).
AXES = [[0, 1, 0], [0, -2.5, 0], [1, 0, 0], [-1.2, 0, 0], [0, 0, 1], [0, 0, -0.7], [1e-9, 1, 0], [0, -1, 1e-8], [1, 1, 1]]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def edge_vectors(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.5)
    vec[: len(AXES)] = torch.tensor(AXES, dtype=torch.float64)
    return vec.to(dtype)


def make_tp(irreps_in, orders, mul):
    return o3.FullyConnectedTensorProduct(
        irreps_in, sh_irreps(orders), hidden_irreps(orders, mul), shared_weights=False, internal_weights=False
    )


CASES = [
    ([0, 1, 2], 5, None),
    ([0, 1, 2], 4, "6x0e"),  # the first block reads scalars only
    ([0, 3, 4, 5, 6], 3, None),
    ([0, 3, 4, 5, 6], 2, "5x0e"),
    ([0, 2, 5], 4, None),
    ([0, 1, 2, 3, 4], 3, None),
    ([0, 1, 4, 7, 8], 1, None),
    ([0, 2, 9, 10], 1, None),
    (list(range(11)), 1, None),  # 381 paths
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("orders,mul,irreps_in", CASES, ids=[f"{o}x{m}-{i or 'hidden'}" for o, m, i in CASES])
def test_product_matches_e3nn(orders, mul, irreps_in, dtype):
    """Per-edge weights (drop-in call) and folded radial MLP, values and gradients."""
    torch.manual_seed(0)
    with default_dtype(dtype):
        tp = make_tp(irreps_in or hidden_irreps(orders, mul), orders, mul)
        fc = FullyConnectedNet([5, 6, tp.weight_numel], torch.nn.functional.silu)
    fast = FastTensorProduct(tp)
    E = 40
    vec = edge_vectors(E, dtype)
    x = torch.randn(E, tp.irreps_in1.dim, dtype=dtype, requires_grad=True)
    w = torch.randn(E, tp.weight_numel, dtype=dtype, requires_grad=True)
    radial = torch.randn(E, 5, dtype=dtype, requires_grad=True)
    sh = o3.spherical_harmonics(sh_irreps(orders), vec, normalize=True, normalization="integral")
    frame = EdgeFrame(vec, max(orders))
    tol = TOL[dtype]

    ref = tp(x, sh, w)
    out = fast(x, frame, w)
    assert_rel_close(out, ref, tol, "per-edge weights")
    go = torch.randn_like(ref)
    for a, b, name in zip(torch.autograd.grad(out, (x, w), go), torch.autograd.grad(ref, (x, w), go), ("x", "weights")):
        assert_rel_close(a, b, tol, f"grad {name}")

    inputs = (x, radial, *fc.parameters())
    ref = tp(x, sh, fc(radial))
    out = fast(x, frame, radial=radial, fc=fc)
    assert_rel_close(out, ref, tol, "folded radial MLP")
    for k, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(ref, inputs, go))):
        assert_rel_close(a, b, tol, f"grad of input {k} (folded)")


def test_product_holds_no_state_and_follows_the_input_dtype():
    with default_dtype(torch.float64):
        tp = make_tp(hidden_irreps([0, 1, 2], 3), [0, 1, 2], 3)
    fast = FastTensorProduct(tp)
    assert list(fast.parameters()) == [] and fast.state_dict() == {}
    vec = edge_vectors(12, torch.float64)
    x = torch.randn(12, tp.irreps_in1.dim, dtype=torch.float64)
    w = torch.randn(12, tp.weight_numel, dtype=torch.float64)
    out64 = fast(x, EdgeFrame(vec, 2), w)
    out32 = fast(x.float(), EdgeFrame(vec.float(), 2), w.float())
    assert out32.dtype == torch.float32
    assert_rel_close(out32.double(), out64, 1e-5, "float32 vs float64")
    with pytest.raises(ValueError):
        fast(x, EdgeFrame(vec, 2, normalization="component"), w)
    with pytest.raises(ValueError):
        fast(x, EdgeFrame(vec, 1), w)


def test_unsupported_products_are_refused():
    tp = o3.FullyConnectedTensorProduct("2x0e+3x1o", "1x0e+1x1o", "2x0e", shared_weights=False, internal_weights=False)
    with pytest.raises(NotImplementedError):
        FastTensorProduct(tp)  # unequal multiplicities
    tp = o3.FullyConnectedTensorProduct("2x1e", "1x1o", "2x1o", shared_weights=False, internal_weights=False)
    with pytest.raises(NotImplementedError):
        FastTensorProduct(tp)  # parity not (-1)^l: odd paths


# ---------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------


def molecule_batch(num_graphs=4, atoms=(5, 12), dtype=torch.float64, seed=0):
    """Random molecule-like bond graphs: a random tree with 1.0-1.5 Å bonds plus one ring-closing bond."""
    g = torch.Generator().manual_seed(seed)
    zs, pos, batch, src, dst, offset = [], [], [], [], [], 0
    for mol in range(num_graphs):
        n = int(torch.randint(atoms[0], atoms[1] + 1, (1,), generator=g))
        p = [torch.zeros(3, dtype=torch.float64)]
        bonds = []
        for i in range(1, n):
            parent = int(torch.randint(i, (1,), generator=g))
            d = torch.randn(3, generator=g, dtype=torch.float64)
            p.append(p[parent] + (1.0 + 0.5 * torch.rand((), generator=g, dtype=torch.float64)) * d / d.norm())
            bonds.append((parent, i))
        bonds.append((0, n - 1))
        for i, j in bonds:
            src += [i + offset, j + offset]
            dst += [j + offset, i + offset]
        zs.append(torch.tensor([1, 6, 7, 8, 9])[torch.randint(5, (n,), generator=g)])
        pos.append(torch.stack(p))
        batch += [mol] * n
        offset += n
    return SimpleNamespace(
        z=torch.cat(zs),
        pos=torch.cat(pos).to(dtype),
        batch=torch.tensor(batch),
        edge_src=torch.tensor(src),
        edge_dst=torch.tensor(dst),
        num_graphs=num_graphs,
    )


def moved(batch, matrix):
    return SimpleNamespace(**{**vars(batch), "pos": batch.pos @ matrix.T})


def both_backends(model, batch):
    """Predictions and parameter gradients of the same model under each backend."""
    result = {}
    for backend in ("e3nn", "fast"):
        model.set_backend(backend)
        model.zero_grad()
        out = model(batch).standardized
        (out * torch.linspace(-1, 2, len(out), dtype=out.dtype)).sum().backward()
        result[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return result


MODELS = [([0, 1, 2], 4), ([0, 3, 4, 5, 6], 2), ([0, 2, 5], 3), ([0, 1, 2, 3, 4], 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("orders,mul", MODELS, ids=[str(o) for o, _ in MODELS])
def test_model_matches_e3nn(orders, mul, dtype):
    torch.manual_seed(0)
    with default_dtype(dtype):
        model = build_model(ModelConfig(orders=orders, hidden_mul=mul, backend="fast"))
    result = both_backends(model, molecule_batch(dtype=dtype))
    (ref, ref_grads), (out, grads) = result["e3nn"], result["fast"]
    assert_rel_close(out, ref, TOL[dtype], "prediction")
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, TOL[dtype], f"grad {name}")


def test_position_gradients_match_e3nn():
    """Edge vectors are differentiable too (forces), with the same result as e3nn."""
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = build_model(ModelConfig(orders=[0, 2, 3], hidden_mul=2, num_blocks=2))
    batch = molecule_batch(2)
    forces = {}
    for backend in ("e3nn", "fast"):
        model.set_backend(backend)
        pos = batch.pos.clone().requires_grad_(True)
        energy = model(SimpleNamespace(**{**vars(batch), "pos": pos})).standardized.sum()
        forces[backend] = torch.autograd.grad(energy, pos)[0]
    assert_rel_close(forces["fast"], forces["e3nn"], 1e-9, "position gradient")


@pytest.mark.parametrize("orders", [[0, 1, 2], [0, 3, 4, 5, 6]])
def test_fast_model_is_invariant(orders):
    torch.manual_seed(2)
    with default_dtype(torch.float64):
        model = build_model(ModelConfig(orders=orders, hidden_mul=3, backend="fast"))
    batch = molecule_batch()
    energy = model(batch).standardized
    R = o3.rand_matrix(dtype=torch.float64)
    for name, matrix in (("rotation", R), ("reflection", -R)):
        assert_rel_close(model(moved(batch, matrix)).standardized, energy, 1e-9, name)


def test_state_dict_and_checkpoints_do_not_depend_on_the_backend():
    torch.manual_seed(0)
    cfg = dict(orders=[0, 2, 5], hidden_mul=3, num_blocks=3)
    a = build_model(ModelConfig(**cfg, backend="e3nn")).double()
    b = build_model(ModelConfig(**cfg, backend="fast")).double()
    assert list(a.state_dict()) == list(b.state_dict())
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    a.set_backend("fast")  # switching creates the fast product but must add nothing to the state
    assert list(a.state_dict()) == list(b.state_dict())
    batch = molecule_batch(3)
    for source, target in ((a, b), (b, a)):
        buf = io.BytesIO()
        torch.save(source.state_dict(), buf)
        buf.seek(0)
        target.load_state_dict(torch.load(buf), strict=True)
        source.set_backend("e3nn")
        target.set_backend("fast")
        # a float32-built e3nn model cast to float64 keeps float32-rounded Clebsch-Gordan constants
        assert_rel_close(target(batch).prediction, source(batch).prediction, 1e-6, "checkpoint")


def test_real_qm9_batch(request):
    try:
        qm9 = request.getfixturevalue("qm9")
    except IrrepscopeError as exc:
        if "install qm9pack" not in str(exc):
            raise  # a corrupt cache or a parser error is a failure, not a missing dataset
        pytest.skip(f"QM9 not installed: {exc}")
    batch = collate(qm9, [0, 1, 7, 100, 2000, 50000, 130000], target="U0_atomization", dtype=torch.float32)
    torch.manual_seed(0)
    with default_dtype(torch.float32):
        model = build_model(ModelConfig(orders=[0, 3, 4, 5, 6], hidden_mul=4))
    result = both_backends(model, batch)
    (ref, ref_grads), (out, grads) = result["e3nn"], result["fast"]
    assert_rel_close(out, ref, 1e-5, "prediction")
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, 1e-5, f"grad {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(orders=[0, 1, 2, 3], hidden_mul=4, backend="fast"))
    batch = molecule_batch(dtype=torch.float32)
    cpu = model(batch).standardized
    model.cuda()
    gpu_batch = SimpleNamespace(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in vars(batch).items()})
    out = model(gpu_batch).standardized
    out.sum().backward()
    assert_rel_close(out.cpu(), cpu, 1e-5, "cuda")
    model.set_backend("e3nn")
    assert_rel_close(out, model(gpu_batch).standardized, 1e-5, "cuda vs e3nn")
