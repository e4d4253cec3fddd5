"""Equivariant targets from QM9's own data: the charge dipole (l = 1) and quadrupole (l = 2).

QM9's Mulliken charges come with its coordinates, in the same frame, so multipoles of the
point charges are proper vector and tensor targets (the polarizability tensor is not: it
lives in the quantum-chemistry program's standard orientation).

Both are taken about the molecule's centre of mass R (so they do not change when the
molecule is translated; Mulliken charges sum to zero only to rounding):

- ``charge_dipole``: mu = sum_i q_i (r_i - R), irreps 1o, in e*Å, components (x, y, z)
  (e3nn's 1o basis is x, y, z).
- ``charge_quadrupole``: the traceless tensor Q_ab = sum_i q_i (3 x_a x_b - |x|^2 delta_ab),
  x = r_i - R (Jackson's convention), in e*Å^2, as its 5 components in e3nn's orthonormal
  basis of 2e (``e3nn.io.CartesianTensor("ij=ji")``, whose 0e part is the trace, zero
  here): the Frobenius norm of Q equals the norm of the 5 components.
"""

from __future__ import annotations

import numpy as np
from ase.data import atomic_masses

from irrepscope.data.structures import MULLIKEN, Structures

# name -> (unit, irreps, description)
EQUIVARIANT_TARGETS: dict[str, tuple[str, str, str]] = {
    "charge_dipole": ("e*Å", "1o", "dipole of the Mulliken point charges about the centre of mass"),
    "charge_quadrupole": ("e*Å^2", "2e", "traceless quadrupole of the Mulliken point charges about the centre of mass"),
}


def is_equivariant(target: str) -> bool:
    """Whether ``target`` is a vector or tensor (not a scalar) target."""
    return target in EQUIVARIANT_TARGETS


def target_irreps(target: str) -> str:
    """Irreps of one molecule's value of ``target``: ``0e`` for the scalar QM9 properties."""
    return EQUIVARIANT_TARGETS[target][1] if target in EQUIVARIANT_TARGETS else "0e"


def target_order(target: str) -> int:
    """The order l of ``target``'s irreps (0 for scalars)."""
    return int(target_irreps(target)[:-1])


def _symmetric_to_2e() -> np.ndarray:
    """[9, 5]: a flattened traceless symmetric 3x3 tensor -> its 2e components, orthonormally.

    The closed form of ``e3nn.io.CartesianTensor("ij=ji").from_cartesian`` without its 0e
    part (tested equal; building that object takes seconds): (sqrt2 T_xz, sqrt2 T_xy,
    (2 T_yy - T_xx - T_zz) / sqrt6, sqrt2 T_yz, (T_zz - T_xx) / sqrt2).
    """
    r2, r6 = 1 / np.sqrt(2), 1 / np.sqrt(6)
    m = np.zeros((3, 3, 5))
    m[0, 2, 0] = m[2, 0, 0] = r2
    m[0, 1, 1] = m[1, 0, 1] = r2
    m[0, 0, 2], m[1, 1, 2], m[2, 2, 2] = -r6, 2 * r6, -r6
    m[1, 2, 3] = m[2, 1, 3] = r2
    m[0, 0, 4], m[2, 2, 4] = -r2, r2
    return m.reshape(9, 5)


def _per_molecule(mols: Structures, values: np.ndarray) -> np.ndarray:
    """[A, ...] -> [M, ...], summed over each molecule's (contiguous, never empty) atoms."""
    return np.add.reduceat(values, mols.atom_ptr[:-1], axis=0)


def centred_positions(mols: Structures) -> np.ndarray:
    """Every atom's position relative to its molecule's centre of mass [A, 3]."""
    mass = atomic_masses[mols.atomic_numbers]
    centre = _per_molecule(mols, mass[:, None] * mols.positions) / _per_molecule(mols, mass)[:, None]
    return mols.positions - np.repeat(centre, np.diff(mols.atom_ptr), axis=0)


def charge_multipoles(mols: Structures) -> dict[str, np.ndarray]:
    """``charge_dipole`` [M, 3] and ``charge_quadrupole`` [M, 5] of every molecule (see the module docstring)."""
    x = centred_positions(mols)
    qx = mols.atom_properties[MULLIKEN][:, None] * x
    dipole = _per_molecule(mols, qx)
    second = _per_molecule(mols, (qx[:, :, None] * x[:, None, :]).reshape(-1, 9))  # sum q x_a x_b, [M, 9]
    trace = second[:, [0, 4, 8]].sum(1, keepdims=True)
    quadrupole = (3 * second - trace * np.eye(3).reshape(1, 9)) @ _symmetric_to_2e()
    return {"charge_dipole": dipole, "charge_quadrupole": quadrupole}
