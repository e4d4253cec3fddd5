"""Predictions for molecules that are not in QM9, read from .xyz/.extxyz files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ase.formula import Formula
from ase.data import chemical_symbols

from irrepscope.data.batching import batch_from_structures
from irrepscope.data.composition import unit_of
from irrepscope.data.qm9 import ATOM_REF_U0_HARTREE
from irrepscope.data.xyz import check_elements, read_structures
from irrepscope.errors import IrrepscopeError
from irrepscope.training.evaluate import model_from_checkpoint
from irrepscope.training.runs import RunDir

# The model was trained on QM9, whose molecules hold these elements only...
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


@torch.no_grad()
def predict_file(run_dir: str | Path, path: str | Path, checkpoint: str = "best", batch_size: int = 64) -> list[dict[str, Any]]:
    """One result per molecule in ``path``: index, formula, prediction, its unit and warnings (molecules unlike QM9's)."""
    run = RunDir.at(run_dir).require()
    structures = read_structures(path)
    for i, (z, _) in enumerate(structures):
        try:
            check_elements(z, TRAINED_ELEMENTS)
        except IrrepscopeError as exc:
            raise IrrepscopeError(f"{path}, molecule {i}: {exc}") from None
    model, config, _ = model_from_checkpoint(run.checkpoint(checkpoint))
    dtype = next(model.parameters()).dtype
    results = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        batch = batch_from_structures(chunk, graph=config.data.graph, cutoff=config.model.cutoff, dtype=dtype)
        for k, value in enumerate(model(batch).prediction.tolist()):
            z = chunk[k][0]
            results.append(
                {
                    "index": start + k,
                    "formula": Formula.from_list([chemical_symbols[int(a)] for a in z]).format("hill"),
                    "prediction": value,
                    "unit": unit_of(config.data.target),
                    "target": config.data.target,
                    "warnings": [f"outside QM9: {note}; the prediction is an extrapolation" for note in outside_qm9(z)],
                }
            )
    return results
