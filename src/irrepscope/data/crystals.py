"""A seeded set of crystal configurations off equilibrium, for analysing universal potentials on solids.

Twelve elemental and binary crystals across bonding types, built with ``ase.build`` at
their experimental lattice constants, in supercells of 32-64 atoms: covalent (Si, C, Ge
diamond; SiC, GaAs zincblende), metallic (Al, Cu, Ni fcc; Fe bcc) and ionic (NaCl, MgO,
LiF rocksalt). Each is rattled (Gaussian, 0.03 Å) and sampled by short Langevin molecular
dynamics (:mod:`irrepscope.data.md`) driven by a SevenNet potential at each temperature
(300 K and 1000 K by default), frames every ``every`` steps after ``equilibration``.

The frames carry no labels: they were sampled with the very model one may analyse on them,
and its own energies would make a "comparison with labels" a comparison with itself. Each
frame's info holds ``class`` (e.g. ``ionic crystal``), ``crystal``, ``temperature_K``,
``seed``, ``frame``, ``md_step`` and ``sampler`` (the model).

Reproducible: crystal ``c`` at temperature ``t`` draws all its randomness (rattle, momenta,
Langevin noise) from ``np.random.default_rng([seed, c, t])``, everything runs on one thread,
and the file is gzip-compressed with no timestamp: the same call writes the same bytes (for
the same sevenn, torch, ASE and numpy).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from irrepscope.atomic import atomic_write, atomic_write_json
from irrepscope.data.md import MDSettings, langevin_positions
from irrepscope.errors import IrrepscopeError

RATTLE = 0.03  # Å
TIMESTEP_FS = 1.0
FRICTION_PER_FS = 0.02


@dataclass(frozen=True)
class Crystal:
    name: str
    bonding: str  # covalent | metallic | ionic
    build: Callable[[], Any]  # -> ase.Atoms (the supercell)


def _bulk(formula: str, structure: str, a: float, repeat: int, **kw: Any) -> Callable[[], Any]:
    def build():
        from ase.build import bulk

        return bulk(formula, structure, a=a, cubic=True, **kw).repeat((repeat, repeat, repeat))

    return build


# Experimental lattice constants (Å, room temperature); conventional cubic cells repeated.
CRYSTALS = [
    Crystal("Si", "covalent", _bulk("Si", "diamond", 5.431, 2)),  # 64 atoms
    Crystal("C", "covalent", _bulk("C", "diamond", 3.567, 2)),  # 64
    Crystal("Ge", "covalent", _bulk("Ge", "diamond", 5.658, 2)),  # 64
    Crystal("SiC", "covalent", _bulk("SiC", "zincblende", 4.360, 2)),  # 64
    Crystal("GaAs", "covalent", _bulk("GaAs", "zincblende", 5.653, 2)),  # 64
    Crystal("Al", "metallic", _bulk("Al", "fcc", 4.050, 2)),  # 32
    Crystal("Cu", "metallic", _bulk("Cu", "fcc", 3.615, 2)),  # 32
    Crystal("Ni", "metallic", _bulk("Ni", "fcc", 3.524, 2)),  # 32
    Crystal("Fe", "metallic", _bulk("Fe", "bcc", 2.870, 3)),  # 54
    Crystal("NaCl", "ionic", _bulk("NaCl", "rocksalt", 5.640, 2)),  # 64
    Crystal("MgO", "ionic", _bulk("MgO", "rocksalt", 4.212, 2)),  # 64
    Crystal("LiF", "ionic", _bulk("LiF", "rocksalt", 4.027, 2)),  # 64
]


def sample_crystals(
    out_path: str | os.PathLike,
    *,
    model: str = "7net-0",
    temperatures: tuple[float, ...] = (300.0, 1000.0),
    frames: int = 2,
    every: int = 10,
    equilibration: int = 20,
    seed: int = 0,
    crystals: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Write the crystal set (gzip extxyz) to ``out_path`` and its parameters to ``OUT.json``; returns the path."""
    from ase import Atoms

    out = Path(out_path)
    if not str(out).endswith(".extxyz.gz"):
        raise IrrepscopeError(f"{out}: the crystal set is written as .extxyz.gz")
    chosen = CRYSTALS if crystals is None else [c for c in CRYSTALS if c.name in crystals]
    unknown = sorted(set(crystals or []) - {c.name for c in CRYSTALS})
    if unknown:
        raise IrrepscopeError(f"unknown crystals {unknown}; choose from {[c.name for c in CRYSTALS]}")
    for name, value in (("frames", frames), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IrrepscopeError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(equilibration, bool) or not isinstance(equilibration, int) or equilibration < 0:
        raise IrrepscopeError(f"equilibration must be an integer >= 0, got {equilibration!r}")
    if not temperatures or not all(isinstance(t, (int, float)) and 0 < t < 1e5 for t in temperatures):
        raise IrrepscopeError(f"temperatures must be positive numbers of kelvin, got {temperatures!r}")
    calc = _calculator(model)
    written = []
    todo = [(c, crystal, t, temperature) for c, crystal in enumerate(CRYSTALS) if crystal in chosen
            for t, temperature in enumerate(temperatures)]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same bits on every machine load
    try:
        for c_index, crystal, t_index, temperature in tqdm(todo, desc="crystal MD", unit="trajectory", disable=not progress):
            rng = np.random.default_rng([seed, c_index, t_index])
            atoms = crystal.build()
            atoms.positions += rng.normal(0.0, RATTLE, atoms.positions.shape)
            atoms.calc = calc
            settings = MDSettings(frames, every, equilibration, float(temperature), TIMESTEP_FS, FRICTION_PER_FS, seed)
            for k, step, pos in langevin_positions(atoms, settings, rng):
                if not np.isfinite(pos).all():
                    raise IrrepscopeError(f"{crystal.name} at {temperature} K: non-finite positions at MD step {step}")
                frame = Atoms(numbers=atoms.numbers, positions=pos, cell=atoms.cell.array, pbc=True)
                frame.info.update({"class": f"{crystal.bonding} crystal", "crystal": crystal.name,
                                   "temperature_K": float(temperature), "seed": seed, "frame": k, "md_step": step,
                                   "sampler": model})  # fmt: skip
                written.append(frame)
    finally:
        torch.set_num_threads(threads)
    import ase.io

    text = io.StringIO()
    ase.io.write(text, written, format="extxyz")
    data = gzip.compress(text.getvalue().encode(), mtime=0)
    atomic_write(out, lambda f: f.write(data))
    params = {"model": model, "temperatures": list(map(float, temperatures)), "frames": frames, "every": every,
              "equilibration": equilibration, "seed": seed, "crystals": [c.name for c in chosen], "rattle_A": RATTLE,
              "timestep_fs": TIMESTEP_FS, "friction_per_fs": FRICTION_PER_FS, "structures": len(written)}  # fmt: skip
    atomic_write_json(Path(str(out) + ".json"), params)
    return out


@functools.lru_cache(maxsize=2)
def _calculator(model: str):
    """SevenNet's own ASE calculator for ``model`` on the CPU (the MD driver; loaded once per process)."""
    from irrepscope.analysis.sevenn_model import PRETRAINED, require_sevenn

    if model not in PRETRAINED and not model.endswith(".pth"):
        raise IrrepscopeError(f"{model}: not a SevenNet model; give a checkpoint (.pth) or one of {', '.join(PRETRAINED)}")
    require_sevenn()
    import warnings

    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SevenNetCalculator(model, device="cpu")
