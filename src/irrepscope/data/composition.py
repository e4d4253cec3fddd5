"""Composition: element counts per molecule and the least-squares fit of a target on them.

One fit serves twice. It is the **composition baseline** that every reported error stands
beside (what a model learns beyond counting atoms), and, for extensive targets, the
**per-element reference energies** that are subtracted before standardising (what
NequIP's per-species shift, MACE's E0s and SchNetPack's atomrefs do). It is always fitted
on the training split only.

Extensive targets (energies, ZPVE, heat capacity, polarizability: sums of roughly
per-atom contributions) are fitted on the counts alone, with no intercept, so that the
fit is itself extensive. Intensive targets (orbital energies, dipole magnitude,
rotational constants, spatial extent) get an intercept: a per-element reference makes no
sense for them, but a linear fit on the composition is still the fair baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from irrepscope.data.multipoles import EQUIVARIANT_TARGETS, is_equivariant
from irrepscope.data.qm9 import PROPERTIES
from irrepscope.data.structures import ENERGY, Structures
from irrepscope.errors import IrrepscopeError

# QM9's elements: H, C, N, O, F.
ELEMENTS: tuple[int, ...] = (1, 6, 7, 8, 9)

# Targets that are (approximately) sums of per-atom contributions.
EXTENSIVE_TARGETS = frozenset(
    {"U0_atomization", "U_atomization", "H_atomization", "G_atomization", "U0", "zpve", "cv", "polarizability", ENERGY}
)


def unit_of(target: str) -> str:
    """The unit of a QM9 property or equivariant target, or eV for a structure file's energies (NequIP's convention)."""
    if target == ENERGY:
        return "eV"
    if is_equivariant(target):
        return EQUIVARIANT_TARGETS[target][0]
    if target not in PROPERTIES:
        raise IrrepscopeError(f"unknown target {target!r}")
    return PROPERTIES[target][0]


# Targets that are energies of the structure: their gradient with respect to the positions is a force.
ENERGY_TARGETS = frozenset({"U0_atomization", "U_atomization", "H_atomization", "G_atomization", "U0", ENERGY})


def is_energy(target: str) -> bool:
    """Whether ``target`` is an energy (eV) whose negative gradient is a force."""
    return target in ENERGY_TARGETS


def is_extensive(target: str) -> bool:
    """Whether ``target`` grows with the number of atoms (a per-element reference applies)."""
    return target in EXTENSIVE_TARGETS


def element_counts(mols: Structures, indices: np.ndarray) -> np.ndarray:
    """Counts of H, C, N, O, F in each of ``mols[indices]``: float64 [M, 5]."""
    indices = np.asarray(indices, dtype=np.int64)
    column = np.full(max(int(mols.atomic_numbers.max()), max(ELEMENTS)) + 1, -1)
    column[list(ELEMENTS)] = np.arange(len(ELEMENTS))
    cols = column[mols.atomic_numbers]
    if np.any(cols < 0):
        raise IrrepscopeError(f"molecules hold elements outside {[chemical_symbols[z] for z in ELEMENTS]}")
    # Counts of every molecule at once (a few tens of ms for all of QM9), then the selection.
    owner = np.repeat(np.arange(len(mols)), np.diff(mols.atom_ptr))
    flat = np.bincount(owner * len(ELEMENTS) + cols, minlength=len(mols) * len(ELEMENTS))
    return flat.reshape(len(mols), len(ELEMENTS))[indices].astype(np.float64)


@dataclass(frozen=True)
class CompositionFit:
    """``target ≈ counts @ per_element + intercept``, fitted by least squares on the training split."""

    target: str
    per_element: dict[int, float]  # atomic number -> value in the target's unit
    intercept: float  # 0 for extensive targets
    n_fit: int  # training molecules the fit saw

    @property
    def unit(self) -> str:
        return unit_of(self.target)

    def predict_counts(self, counts: np.ndarray) -> np.ndarray:
        coef = np.array([self.per_element.get(z, 0.0) for z in ELEMENTS])
        return counts @ coef + self.intercept

    def predict(self, mols: Structures, indices: np.ndarray) -> np.ndarray:
        """The baseline prediction for ``mols[indices]`` (target unit)."""
        return self.predict_counts(element_counts(mols, indices))

    def reference_vector(self, num_elements: int) -> np.ndarray:
        """Per-element values indexed by atomic number (zeros elsewhere): the model's reference buffer."""
        out = np.zeros(num_elements)
        for z, v in self.per_element.items():
            if z >= num_elements:
                raise IrrepscopeError(f"model.num_elements = {num_elements} cannot hold element Z = {z}")
            out[z] = v
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "unit": self.unit,
            "fit": "least squares of the target on element counts, training split only",
            "n_fit": self.n_fit,
            "intercept": self.intercept,
            "per_element": {chemical_symbols[z]: {"z": z, "value": v} for z, v in self.per_element.items()},
        }


def baseline_name(target: str) -> str:
    """What the baseline of ``target`` is called in reports."""
    return "zero baseline" if is_equivariant(target) else "composition baseline"


def baseline_rule(target: str) -> str:
    """What the baseline of ``target`` is, in one line (usage.json's ``baseline_rule`` starts with it)."""
    what = (
        "the zero vector, what any function of the composition must predict"
        if is_equivariant(target)
        else "least squares on element counts, training split only"
    )
    return f"{baseline_name(target)}: {what}"


def baseline_errors(mols: Structures, train_indices: np.ndarray, indices: np.ndarray, target: str) -> dict[str, float]:
    """MAE and RMSE (target unit) on ``mols[indices]`` of the composition fit on ``mols[train_indices]``: the baseline.

    For a vector or tensor target the baseline is the zero vector: a function of the
    composition alone (or of any rotation-invariant description) cannot point anywhere.
    """
    err = baseline_residuals(mols, train_indices, indices, target)
    return {"baseline_mae_ev": float(np.mean(np.abs(err))), "baseline_rmse_ev": float(np.sqrt(np.mean(err**2)))}


def baseline_residuals(mols: Structures, train_indices: np.ndarray, indices: np.ndarray, target: str) -> np.ndarray:
    """Per molecule of ``mols[indices]``, the baseline's prediction minus the target (a vector target: the error's length)."""
    indices = np.asarray(indices, dtype=np.int64)
    if is_equivariant(target):
        return np.linalg.norm(mols.properties[target][indices], axis=1)  # the zero vector's error: the target's length
    return fit_composition(mols, train_indices, target).predict(mols, indices) - mols.properties[target][indices]


FORCE_UNIT = "eV/Å"


def force_baseline_errors(forces: np.ndarray) -> dict[str, float]:
    """The zero-force baseline's MAE per component and RMSE (eV/Å) on ``forces`` [A, 3]: what predicting no force scores."""
    forces = np.asarray(forces, dtype=np.float64)
    return {"force_baseline_mae": float(np.mean(np.abs(forces))), "force_baseline_rmse": float(np.sqrt(np.mean(forces**2)))}


def fit_composition(mols: Structures, train_indices: np.ndarray, target: str) -> CompositionFit:
    """Least-squares fit of ``target`` on element counts over ``mols[train_indices]`` (never other molecules)."""
    unit_of(target)  # an unknown target is an error
    if is_equivariant(target):
        raise IrrepscopeError(f"{target} is a vector/tensor target: no composition fit (its baseline is zero)")
    train_indices = np.asarray(train_indices, dtype=np.int64)
    if len(train_indices) == 0:
        raise IrrepscopeError("cannot fit the composition baseline on an empty training split")
    counts = element_counts(mols, train_indices)
    y = mols.properties[target][train_indices]
    intercept = not is_extensive(target)
    design = np.hstack([counts, np.ones((len(counts), 1))]) if intercept else counts
    # An element absent from the training split has an all-zero column: lstsq gives it 0.
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    per_element = {z: float(coef[k]) for k, z in enumerate(ELEMENTS)}
    return CompositionFit(target, per_element, float(coef[-1]) if intercept else 0.0, int(len(train_indices)))
