"""Forces of our model: the exact negative gradient of its energy, equivariant, on both backends."""

import dataclasses

import numpy as np
import pytest
import torch
from e3nn import o3

from irrepscope.config import ModelConfig
from irrepscope.data.batching import collate
from irrepscope.model.network import build_model, energy_and_forces

from helpers import default_dtype
from test_model import permuted, rotated


@pytest.fixture(scope="module")
def radius_batch(qm9):
    return collate(qm9, [0, 5, 100, 2000, 50000], target="U0_atomization", graph="radius", cutoff=4.0, dtype=torch.float64)


def smooth_model(orders, backend, seed=0):
    torch.manual_seed(seed)
    with default_dtype(torch.float64):
        model = build_model(
            ModelConfig(orders=orders, hidden_mul=3, num_blocks=3, cutoff=4.0, radial_envelope="polynomial", backend=backend)
        )
    model.set_target_stats(-76.0, 10.0)
    return model.double()


@pytest.mark.parametrize("orders", [[0, 1, 2], [0, 2, 3]])
@pytest.mark.parametrize("backend", ["e3nn", "fast"])
def test_forces_equal_a_central_finite_difference(radius_batch, orders, backend):
    model = smooth_model(orders, backend)
    _, forces = energy_and_forces(model, radius_batch)
    rng = np.random.default_rng(0)
    h = 1e-5
    for atom in rng.choice(len(radius_batch.z), size=6, replace=False):
        for axis in range(3):
            step = torch.zeros_like(radius_batch.pos)
            step[atom, axis] = h
            up = model(dataclasses.replace(radius_batch, pos=radius_batch.pos + step)).prediction.sum()
            down = model(dataclasses.replace(radius_batch, pos=radius_batch.pos - step)).prediction.sum()
            fd = -(up - down).item() / (2 * h)
            assert forces[atom, axis].item() == pytest.approx(fd, rel=1e-5, abs=1e-7), (atom, axis)


@pytest.mark.parametrize("backend", ["e3nn", "fast"])
def test_energy_invariant_and_forces_equivariant(radius_batch, backend):
    model = smooth_model([0, 1, 2], backend, seed=3)
    out, forces = energy_and_forces(model, radius_batch)
    R = o3.rand_matrix(dtype=torch.float64)
    perm = torch.randperm(len(radius_batch.z))
    cases = {
        "rotation": (rotated(radius_batch, R), R, None),
        "reflection": (rotated(radius_batch, -R), -R, None),
        "translation": (dataclasses.replace(radius_batch, pos=radius_batch.pos + torch.tensor([2.0, -1.0, 4.0]).double()), None, None),
        "permutation": (permuted(radius_batch, perm), None, perm),
    }
    for name, (moved, matrix, p) in cases.items():
        out2, forces2 = energy_and_forces(model, moved)
        torch.testing.assert_close(out2.prediction, out.prediction, rtol=1e-10, atol=1e-9, msg=name)
        expected = forces @ matrix.T if matrix is not None else forces
        expected = expected[p] if p is not None else expected
        torch.testing.assert_close(forces2, expected, rtol=1e-8, atol=1e-10, msg=name)


def test_both_backends_give_the_same_forces(radius_batch):
    e3nn_model = smooth_model([0, 1, 2], "e3nn", seed=5)
    fast = smooth_model([0, 1, 2], "e3nn", seed=5)
    fast.set_backend("fast")
    (_, a), (_, b) = energy_and_forces(e3nn_model, radius_batch), energy_and_forces(fast, radius_batch)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_forces_under_no_grad(radius_batch):
    """Evaluation code runs under no_grad; the forces must still come out (and keep no graph)."""
    model = smooth_model([0, 1], "fast")
    with torch.no_grad():
        _, forces = energy_and_forces(model, radius_batch)
    assert forces.shape == radius_batch.pos.shape and not forces.requires_grad
    assert torch.isfinite(forces).all() and forces.abs().max() > 0
