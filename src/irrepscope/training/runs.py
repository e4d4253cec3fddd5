"""A run directory and its files: the one place that knows where a run keeps what.

    RUN_DIR/config.yaml          resolved config (every key, defaults filled in)
    RUN_DIR/split.json           the split's indices into QM9 (+ seed, fractions, limit)
    RUN_DIR/composition.json     the composition fit (training split): baseline and per-element reference
    RUN_DIR/metrics.csv          one row per finished epoch
    RUN_DIR/checkpoints/last.pt  after every epoch: weights, optimiser, epoch, config
    RUN_DIR/checkpoints/best.pt  the epoch with the lowest validation MAE
    RUN_DIR/test.json            held-out test metrics of best.pt

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from irrepscope.atomic import atomic_write, atomic_write_json, atomic_write_text
from irrepscope.config import Config, config_from_dict, load_config, with_legacy_values
from irrepscope.errors import IrrepscopeError

CHECKPOINT_FORMAT = "irrepscope-checkpoint-v1"
METRIC_FIELDS = [
    "epoch", "train_loss", "val_mae_mev", "val_rmse_mev", "val_baseline_mae_mev", "val_force_mae", "val_force_baseline_mae",
    "lr", "epoch_seconds", "molecules_per_s", "device",
]  # fmt: skip


@dataclass(frozen=True)
class RunDir:
    """Paths of one run."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "RunDir":
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def composition(self) -> Path:
        return self.root / "composition.json"

    @property
    def test(self) -> Path:
        return self.root / "test.json"

    def checkpoint(self, which: str = "best") -> Path:
        return self.root / "checkpoints" / f"{which}.pt"

    def require(self) -> "RunDir":
        """Fail clearly unless this looks like a run directory."""
        if not self.root.is_dir():
            raise IrrepscopeError(f"run directory not found: {self.root}")
        if not self.config.is_file():
            raise IrrepscopeError(f"{self.root} is not a run directory (no config.yaml)")
        return self

    def load_config(self) -> Config:
        return load_config(self.require().config, run_record=True)

    def write_config(self, config: Config) -> None:
        atomic_write_text(self.config, config.to_yaml())

    def write_test(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.test, metrics)

    def read_metrics(self) -> list[dict[str, str]]:
        """The rows of metrics.csv (none when it does not exist); an unreadable file is a clear error."""
        if not self.metrics.is_file():
            return []
        try:
            with self.metrics.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            for row in rows:
                int(row["epoch"])
        except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
            raise IrrepscopeError(f"{self.metrics} is not a metrics file written by irrepscope") from None
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics, buf.getvalue())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; ``state`` must hold ``config`` (a dict) and ``model`` (a state dict)."""
    payload = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with clear errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise IrrepscopeError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IrrepscopeError(f"corrupt checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise IrrepscopeError(f"{path} is not an irrepscope checkpoint")
    for key in ("config", "model"):
        if key not in state:
            raise IrrepscopeError(f"corrupt checkpoint {path}: missing {key!r}")
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path = "checkpoint") -> Config:
    """The config a checkpoint carries."""
    return config_from_dict(with_legacy_values(state["config"]), source=f"{path} (embedded config)")
