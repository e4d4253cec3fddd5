"""Load a trained model from a run and evaluate it on the run's own saved split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irrepscope.config import Config
from irrepscope.data.batching import iterate_batches
from irrepscope.data.composition import baseline_errors
from irrepscope.data.qm9 import PROPERTIES, Molecules, load_qm9
from irrepscope.data.split import load_split
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import EquivariantGraphConv, build_model
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
    model = build_model(config.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise IrrepscopeError(f"checkpoint {path} does not match its own config: {str(exc).splitlines()[0]}") from None
    model.to(device=torch.device(device), dtype=torch_dtype(config.train.dtype))
    model.eval()
    return model, config, state


@torch.no_grad()
def predict(
    model: EquivariantGraphConv, mols: Molecules, indices: np.ndarray, config: Config, batch_size: int | None = None
) -> np.ndarray:
    """Predictions (target unit) for ``mols[indices]``, in the order given."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
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
        out.append(model(batch.to(device)).prediction.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def regression_metrics(prediction: np.ndarray, target: np.ndarray) -> dict[str, float | int]:
    """MAE and RMSE (in the target's unit) and the number of molecules."""
    if len(target) == 0:
        raise IrrepscopeError("cannot evaluate on an empty set of molecules")
    err = np.asarray(prediction, dtype=float) - np.asarray(target, dtype=float)
    return {"mae_ev": float(np.mean(np.abs(err))), "rmse_ev": float(math.sqrt(np.mean(err**2))), "n": int(len(err))}


def evaluate_run(
    run_dir: str | Path, split: str = "test", which: str = "best", device: str = "cpu", mols: Molecules | None = None
) -> dict[str, Any]:
    """Metrics of a run's checkpoint on one of its own saved splits (``mols``: QM9 if already loaded)."""
    run = RunDir.at(run_dir).require()
    model, config, state = model_from_checkpoint(run.checkpoint(which), resolve_device(device))
    if mols is None:
        mols = load_qm9(config.data.cache_dir, progress=False)
    splits = load_split(run.split)
    indices = splits[split]
    pred = predict(model, mols, indices, config)
    target = mols.properties[config.data.target][indices]
    metrics = {**regression_metrics(pred, target), **baseline_errors(mols, splits["train"], indices, config.data.target)}
    return {
        **metrics,
        "mae_ratio_to_baseline": baseline_ratio(metrics),
        "split": split,
        "target": config.data.target,
        "unit": PROPERTIES[config.data.target][0],  # mae_ev/rmse_ev are in this unit
        "reference": config.data.reference,
        "checkpoint": which,
        "epoch": int(state.get("epoch", 0)),
        "params": model.num_parameters(),
    }


def baseline_ratio(metrics: dict[str, Any]) -> float | None:
    """Model MAE / baseline MAE (below 1: better than counting atoms); None for a perfect baseline."""
    return metrics["mae_ev"] / metrics["baseline_mae_ev"] if metrics["baseline_mae_ev"] > 0 else None
