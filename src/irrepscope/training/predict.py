"""Predictions (and forces) for structures that are not in the run's data, read from .xyz/.extxyz files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols
from ase.formula import Formula

from irrepscope.data.composition import FORCE_UNIT, is_energy, unit_of
from irrepscope.data.qm9 import ATOM_REF_U0_HARTREE
from irrepscope.data.structures import refuse_periodic
from irrepscope.data.xyz import check_elements, read_structures
from irrepscope.errors import IrrepscopeError
from irrepscope.training.evaluate import model_from_checkpoint, predict_all
from irrepscope.training.runs import RunDir

# The models are trained on QM9 molecules (or xTB frames of them), which hold these elements only...
TRAINED_ELEMENTS = set(ATOM_REF_U0_HARTREE)
# ...and 3 to 29 atoms, at most 9 of them heavy.
QM9_ATOMS = (3, 29)
QM9_HEAVY_ATOMS = 9


def outside_qm9(z) -> list[str]:
    """Why a molecule lies outside what a QM9-trained model has seen (empty when it does not)."""
    n, heavy = len(z), int((z > 1).sum())
    notes = []
    if not QM9_ATOMS[0] <= n <= QM9_ATOMS[1]:
        notes.append(f"{n} atoms (QM9 molecules have {QM9_ATOMS[0]} to {QM9_ATOMS[1]})")
    if heavy > QM9_HEAVY_ATOMS:
        notes.append(f"{heavy} heavy atoms (QM9: at most {QM9_HEAVY_ATOMS})")
    return notes


def _finite(values: np.ndarray, what: str, path: str | Path, index: int) -> None:
    if not np.all(np.isfinite(values)):
        raise IrrepscopeError(
            f"{path}, molecule {index}: the model's {what} is not finite (coordinates too large for the model's "
            "precision?)"
        )


def predict_file(run_dir: str | Path, path: str | Path, checkpoint: str = "best", batch_size: int = 64) -> list[dict[str, Any]]:
    """One result per structure in ``path``: index, formula, prediction, its unit, forces (energy models) and warnings.

    Forces are ``-dE/dpositions`` of the predicted energy (eV/Å), one ``[x, y, z]`` per
    atom. Periodic structures are refused: the model has no periodic images.
    """
    run = RunDir.at(run_dir).require()
    structures = read_structures(path)
    refuse_periodic(structures)
    for i in range(len(structures)):
        try:
            check_elements(structures.structure(i)[0], TRAINED_ELEMENTS)
        except IrrepscopeError as exc:
            raise IrrepscopeError(f"{path}, molecule {i}: {exc}") from None
    model, config, state = model_from_checkpoint(run.checkpoint(checkpoint))
    run.check_checkpoint(state, checkpoint)
    pred = predict_all(model, structures, np.arange(len(structures)), config, batch_size, forces=is_energy(config.data.target))
    unit = unit_of(config.data.target)
    results = []
    for i in range(len(structures)):
        z = structures.structure(i)[0]
        value = pred.prediction[i]
        _finite(value, "prediction", path, i)
        result = {
            "index": i,
            "formula": Formula.from_list([chemical_symbols[int(a)] for a in z]).format("hill"),
            "prediction": value.tolist() if np.ndim(value) else float(value),
            "unit": unit,
            "target": config.data.target,
        }
        if pred.forces is not None:
            forces = pred.forces[structures.atom_ptr[i] : structures.atom_ptr[i + 1]]
            _finite(forces, "force", path, i)
            result.update(forces=forces.tolist(), force_unit=FORCE_UNIT)
        notes = [f"outside QM9: {note}; the prediction is an extrapolation" for note in outside_qm9(z)]
        if i == 0 and pred.forces is not None and config.data.graph == "bond":  # said once, on the first structure
            notes.append("forces of a bond-graph model: non-bonded atoms exert none, and they jump where a bond is perceived or lost")
        result["warnings"] = notes
        results.append(result)
    return results
