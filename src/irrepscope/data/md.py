"""Short Langevin molecular dynamics with ASE: the sampler behind the xTB set and the crystal set.

:func:`langevin_positions` thermalises a structure (Maxwell-Boltzmann momenta from a given
random stream, no net momentum; no net angular momentum for a molecule in vacuum), runs
ASE's Langevin integrator with the structure's own calculator and yields the positions of
the frames, rounded as extended XYZ writes them, so that labels computed on them are the
labels of exactly the geometry the file holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# extxyz writes positions with "%16.8f"; labels are computed on exactly the positions the file holds.
POSITION_DECIMALS = 8


@dataclass(frozen=True)
class MDSettings:
    """What determines one trajectory and its frames."""

    frames: int
    every: int
    equilibration: int
    temperature: float  # K
    timestep_fs: float
    friction_per_fs: float
    seed: int

    def md_step(self, frame: int) -> int:
        """The MD step at which frame ``frame`` (0-based) is taken."""
        return self.equilibration + frame * self.every


def langevin_positions(atoms: Any, s: MDSettings, rng: np.random.Generator) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(frame, md_step, positions)`` of Langevin MD of ``atoms`` (its calculator drives it), ``rng`` its only randomness."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    thermalize(atoms, s.temperature, rng)
    atoms.set_constraint(FixCom())  # ASE >= 3.28: rather than Langevin's deprecated fixcm=True
    dyn = Langevin(
        atoms,
        timestep=s.timestep_fs * units.fs,
        temperature_K=s.temperature,
        friction=s.friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    step = 0
    for k in range(s.frames):
        target = s.md_step(k)
        if target > step:
            dyn.run(target - step)
            step = target
        # The positions as extxyz writes them ("%16.8f"), parsed back: the file's geometry, exactly.
        yield k, step, np.array([[float(f"{x:.{POSITION_DECIMALS}f}") for x in row] for row in atoms.positions])


def thermalize(atoms: Any, temperature: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature``, then zero total momentum (and, in vacuum, angular momentum)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29 (MaxwellBoltzmannDistribution is deprecated there)
        vd.thermalize_momenta(atoms, temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)
    if atoms.get_pbc().any():  # a crystal has no rotation to remove
        return
    before = atoms.get_momenta()
    with np.errstate(all="ignore"):
        vd.ZeroRotation(atoms)
    if not np.isfinite(atoms.get_momenta()).all():
        # Exactly linear geometries (acetylene, QM9 4): a zero principal moment makes ASE divide by zero.
        atoms.set_momenta(before)
        _zero_rotation_pinv(atoms)


def _zero_rotation_pinv(atoms: Any) -> None:
    """Remove the angular momentum about the centre of mass, with a pseudo-inverse inertia tensor."""
    masses = atoms.get_masses()
    r = atoms.get_positions() - atoms.get_center_of_mass()
    p = atoms.get_momenta()
    angular = np.cross(r, p).sum(axis=0)
    outer = (r * r).sum(axis=1)[:, None, None] * np.eye(3) - r[:, :, None] * r[:, None, :]
    inertia = (masses[:, None, None] * outer).sum(axis=0)
    omega = np.linalg.pinv(inertia, rcond=1e-8, hermitian=True) @ angular
    atoms.set_momenta(p - masses[:, None] * np.cross(omega, r))
