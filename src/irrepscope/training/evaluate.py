"""Load a trained model from a run and evaluate it on the run's own saved split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irrepscope.config import Config
from irrepscope.data.batching import iterate_batches
from irrepscope.data.composition import FORCE_UNIT, baseline_errors, is_energy, fit_composition, force_baseline_errors, unit_of
from irrepscope.data.sources import load_run_structures
from irrepscope.data.structures import ENERGY, FORCES, Structures
from irrepscope.data.split import load_split
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import EquivariantGraphConv, build_run_model, energy_and_forces
from irrepscope.training.runs import RunDir, checkpoint_config, load_checkpoint


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IrrepscopeError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IrrepscopeError(f"device {name!r} requested but CUDA is not available")
    return device


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", backend: str | None = None
) -> tuple[EquivariantGraphConv, Config, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (any backend loads any checkpoint)."""
    state = load_checkpoint(path)
    config = checkpoint_config(state, path)
    if backend is not None:
        config.model.backend = backend
    model = build_run_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise IrrepscopeError(f"checkpoint {path} does not match its own config: {str(exc).splitlines()[0]}") from None
    model.to(device=torch.device(device), dtype=torch_dtype(config.train.dtype))
    model.eval()
    return model, config, state


def _batches(model: EquivariantGraphConv, mols: Structures, indices: np.ndarray, config: Config, batch_size: int | None):
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for batch in iterate_batches(
        mols,
        indices,
        batch_size or config.train.eval_batch_size,
        shuffle=False,
        seed=None,
        target=None,
        graph=config.data.graph,
        cutoff=config.model.cutoff,
        dtype=dtype,
    ):
        yield batch.to(device)


def predict(
    model: EquivariantGraphConv, mols: Structures, indices: np.ndarray, config: Config, batch_size: int | None = None
) -> np.ndarray:
    """Predictions (target unit) for ``mols[indices]``, in the order given."""
    return predict_all(model, mols, indices, config, batch_size).prediction


@dataclass
class Predictions:
    """A model's predictions for some structures, in the order given."""

    prediction: np.ndarray  # [M] (or [M, k] for a vector or tensor target), target unit
    auxiliary: dict[str, np.ndarray]  # per auxiliary head, its target's unit
    forces: np.ndarray | None = None  # [A, 3] eV/Å, the atoms of the structures concatenated in order


def predict_all(
    model: EquivariantGraphConv,
    mols: Structures,
    indices: np.ndarray,
    config: Config,
    batch_size: int | None = None,
    forces: bool = False,
) -> Predictions:
    """In one pass: the predictions, the auxiliary heads' predictions and (``forces``) ``-dE/dpositions``."""
    main: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in model.auxiliary_heads}
    force_parts: list[np.ndarray] = []
    for batch in _batches(model, mols, indices, config, batch_size):
        if forces:
            o, f = energy_and_forces(model, batch)
            force_parts.append(f.detach().double().cpu().numpy())
        else:
            with torch.no_grad():
                o = model(batch)
        main.append(o.prediction.detach().double().cpu().numpy())
        for name, value in model.auxiliary_predictions(o).items():
            parts[name].append(value.detach().double().cpu().numpy())
    for values, what in ((main, "predictions"), (force_parts, "forces")):
        bad = sum(int(np.count_nonzero(~np.isfinite(v))) for v in values)
        if bad:  # never a NaN in a metric or a printout without an error
            raise IrrepscopeError(
                f"{bad} of the model's {what} for {len(indices)} structures are not finite (diverged weights, or inputs beyond "
                "the model's precision)"
            )
    return Predictions(
        np.concatenate(main) if main else np.zeros(0),
        {name: np.concatenate(v) for name, v in parts.items()},
        (np.concatenate(force_parts) if force_parts else np.zeros((0, 3))) if forces else None,
    )


def regression_metrics(prediction: np.ndarray, target: np.ndarray) -> dict[str, float | int]:
    """MAE and RMSE (in the target's unit) and the number of molecules.

    For a vector or tensor target ``[M, k]`` the error of a molecule is the length of its
    error vector (rotation invariant, unlike per-component errors): ``mae_ev``/``rmse_ev``
    are its mean and RMS; ``component_mae`` is the mean absolute error per component and
    ``norm_mae`` the mean error of the predicted length.
    """
    if len(target) == 0:
        raise IrrepscopeError("cannot evaluate on an empty set of molecules")
    prediction, target = np.asarray(prediction, dtype=float), np.asarray(target, dtype=float)
    err = prediction - target
    size = np.linalg.norm(err, axis=1) if err.ndim == 2 else np.abs(err)
    out = {"mae_ev": float(np.mean(size)), "rmse_ev": float(math.sqrt(np.mean(size**2))), "n": int(len(err))}
    if err.ndim == 2:
        out["component_mae"] = float(np.mean(np.abs(err)))
        out["norm_mae"] = float(np.mean(np.abs(np.linalg.norm(prediction, axis=1) - np.linalg.norm(target, axis=1))))
    return out


def energy_force_metrics(mols: Structures, indices: np.ndarray, pred: Predictions, train_indices: np.ndarray) -> dict[str, Any]:
    """Per-atom energy errors beside the composition baseline's, and force errors beside the zero-force baseline's.

    ``mae_per_atom_ev``: mean over structures of |error| / atoms; ``force_mae``: mean
    absolute error per force component, ``force_rmse`` over components (eV/Å); the
    zero-force baseline predicts no force at all (its errors are the forces' own sizes).
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = np.asarray(mols.num_atoms(), dtype=np.float64)[indices]
    target = mols.properties[ENERGY][indices]
    baseline = fit_composition(mols, train_indices, ENERGY).predict(mols, indices)
    out: dict[str, Any] = {
        "mae_per_atom_ev": float(np.mean(np.abs(pred.prediction - target) / n)),
        "baseline_mae_per_atom_ev": float(np.mean(np.abs(baseline - target) / n)),
    }
    if pred.forces is not None:
        true = mols.atom_values(FORCES, indices)
        err = pred.forces - true
        out.update(
            {
                "force_mae": float(np.mean(np.abs(err))),
                "force_rmse": float(np.sqrt(np.mean(err**2))),
                **force_baseline_errors(true),
                "force_unit": FORCE_UNIT,
                "n_atoms": int(len(true)),
            }
        )
    return out


def evaluate_run(
    run_dir: str | Path, split: str = "test", which: str = "best", device: str = "cpu", mols: Structures | None = None
) -> dict[str, Any]:
    """Metrics of a run's checkpoint on one of its own saved splits (``mols``: its structures if already loaded).

    Where the structures carry forces, the model's forces (``-dE/dpositions``) are scored
    too, also for a model trained on energies only.
    """
    run = RunDir.at(run_dir).require()
    model, config, state = model_from_checkpoint(run.checkpoint(which), resolve_device(device))
    run.check_checkpoint(state, which)
    if mols is None:
        mols = load_run_structures(config.data, run.split)
    splits = load_split(run.split, len(mols))
    indices = splits[split]
    with_forces = FORCES in mols.atom_properties and is_energy(config.data.target)
    pred = predict_all(model, mols, indices, config, forces=with_forces)
    target = mols.properties[config.data.target][indices]
    metrics = {**regression_metrics(pred.prediction, target), **baseline_errors(mols, splits["train"], indices, config.data.target)}
    if config.data.target == ENERGY:
        metrics.update(energy_force_metrics(mols, indices, pred, splits["train"]))
    auxiliary = {}
    for name, value in pred.auxiliary.items():
        aux = {**regression_metrics(value, mols.properties[name][indices]), **baseline_errors(mols, splits["train"], indices, name)}
        auxiliary[name] = {**aux, "unit": unit_of(name)}
    return {
        **metrics,
        **({"auxiliary": auxiliary} if auxiliary else {}),
        "mae_ratio_to_baseline": baseline_ratio(metrics),
        "split": split,
        "target": config.data.target,
        "unit": unit_of(config.data.target),  # mae_ev/rmse_ev are in this unit
        "reference": config.data.reference,
        "checkpoint": which,
        "epoch": int(state.get("epoch", 0)),
        "params": model.num_parameters(),
    }


def baseline_ratio(metrics: dict[str, Any]) -> float | None:
    """Model MAE / baseline MAE (below 1: better than counting atoms); None for a perfect baseline."""
    return metrics["mae_ev"] / metrics["baseline_mae_ev"] if metrics["baseline_mae_ev"] > 0 else None
