"""A run directory and its files: the one place that knows where a run keeps what.

    RUN_DIR/config.yaml          resolved config (every key, defaults filled in)
    RUN_DIR/split.json           the split's indices into QM9 (+ seed, fractions, limit)
    RUN_DIR/composition.json     the composition fit (training split): baseline and per-element reference
    RUN_DIR/metrics.csv          one row per finished epoch
    RUN_DIR/checkpoints/last.pt  after every epoch: weights, optimiser, epoch, config
    RUN_DIR/checkpoints/best.pt  the epoch with the lowest validation MAE
    RUN_DIR/test.json            held-out test metrics of best.pt

Every file is written atomically (temporary file, then rename).

The files pin each other (README "Integrity"): every checkpoint records the sha256 of the
split.json and composition.json it was trained with (``pins``) and embeds its config;
test.json and an analysis record the sha256 of the checkpoint they were made from, and of
the split and composition. :meth:`RunDir.check_checkpoint` and :meth:`RunDir.check_pins`
refuse a run whose files disagree (a split edited by hand is a different split; another
run's best.pt copied in names another split). Files written before pins existed carry
none and are taken as they are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from irrepscope.atomic import atomic_write, atomic_write_json, atomic_write_text
from irrepscope.config import Config, config_from_dict, load_config, recipe_differences, with_legacy_values
from irrepscope.errors import IrrepscopeError

CHECKPOINT_FORMAT = "irrepscope-checkpoint-v1"
# What a run directory may hold: its files, its outputs, and the markers of locks, failures and (from sweeps of
# irrepscope before Ray) claims.
RUN_FILES = frozenset({
    "config.yaml", "split.json", "composition.json", "metrics.csv", "checkpoints", "test.json", "analysis",
    "pruned.yaml", "comparison", ".lock", ".claim", ".failed", "sessions.jsonl",
})  # fmt: skip
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

    @property
    def sessions(self) -> Path:
        """sessions.jsonl: one line per training session (fresh or resumed), where it started and ran."""
        return self.root / "sessions.jsonl"

    def append_session(self, start_epoch: int, device: str) -> None:
        """Record that a training session starts after ``start_epoch`` finished epochs (0: a fresh run).

        The record of who trained what: a run resumed after a kill shows two sessions, the
        second starting where the first's last checkpoint ended, never at 0 again.
        """
        line = {"start_epoch": start_epoch, "host": socket.gethostname(), "pid": os.getpid(),
                "device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        with self.sessions.open("a", encoding="utf-8") as f:  # one short line per append: whole or absent
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_sessions(self) -> list[dict[str, Any]]:
        """The training sessions recorded so far (a torn last line, from a kill mid-write, is skipped)."""
        if not self.sessions.is_file():
            return []
        out = []
        for text in self.sessions.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:
                continue
        return out

    def refuse_foreign_files(self) -> None:
        """Refuse to train into a folder that holds files no run writes (a fresh run would mix in with them)."""
        if not self.root.is_dir():
            return
        foreign = sorted(p.name for p in self.root.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
        if foreign:
            raise IrrepscopeError(
                f"--out {self.root} holds files that are not a run's ({', '.join(foreign[:3])}); choose an empty or new folder"
            )

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
        """test.json of best.pt, pinned to it (and to the split and composition)."""
        atomic_write_json(self.test, {**metrics, "pins": self.pins("best")})

    def read_test(self) -> dict[str, Any] | None:
        """test.json (None when the run has none), refused when it was made from other files than the run's."""
        if not self.test.is_file():
            return None
        try:
            test = json.loads(self.test.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IrrepscopeError(f"cannot read {self.test}: {exc}") from None
        if not isinstance(test, dict):
            raise IrrepscopeError(f"{self.test} is not a test.json written by irrepscope")
        self.check_pins(test.get("pins"), self.test, "irrepscope evaluate RUN_DIR")
        return test

    # -- pins: what each file was made from -------------------------------------------------
    def pins(self, checkpoint: str | None = None) -> dict[str, str]:
        """sha256 of the run's split.json and composition.json (and of ``checkpoints/<checkpoint>.pt``), as they are now."""
        out = {}
        paths = [self.split, self.composition] + ([self.checkpoint(checkpoint)] if checkpoint else [])
        for path in paths:
            if path.is_file():
                out[path.relative_to(self.root).as_posix()] = file_pin(path)
        return out

    def check_pins(self, recorded: Any, made: Path, remedy: str) -> None:
        """Refuse ``made`` (a checkpoint, test.json, usage.json) if a file it recorded has changed since.

        A recorded file that is gone is not checked (records kept without their checkpoints,
        like a sweep's in git); whoever needs it fails on its absence.
        """
        if recorded is None:
            return  # written before pins existed
        if not isinstance(recorded, dict):
            raise IrrepscopeError(f"{made}: corrupt pins {recorded!r}")
        changed = [name for name, sha in recorded.items() if (self.root / name).is_file() and file_pin(self.root / name) != sha]
        if changed:
            raise IrrepscopeError(
                f"{self.root}: {made.relative_to(self.root) if made.is_relative_to(self.root) else made} was made from another "
                f"{' and '.join(changed)} than the run holds now (edited, copied from another run, or left by an "
                f"interrupted one); refusing to mix them: restore the file, or redo it ({remedy})"
            )

    def check_checkpoints(self) -> None:
        """Refuse a run whose checkpoints were not trained with its config, split and composition."""
        for which in ("best", "last"):
            if self.checkpoint(which).is_file():
                self.check_checkpoint(load_checkpoint(self.checkpoint(which)), which)

    def _check_split_meta(self, config: Config, made: Path) -> None:
        """What split.json says it was drawn with must be what the config draws (also for files without pins)."""
        if not self.split.is_file():
            return
        from irrepscope.data.split import load_split_meta

        meta = load_split_meta(self.split)
        wanted = {"seed": config.train.seed, "limit": config.data.limit, "fractions": list(config.data.split)}
        differ = [f"{k} {meta[k]} (split.json) vs {v} ({made.name})" for k, v in wanted.items() if k in meta and meta[k] != v]
        if differ:
            raise IrrepscopeError(
                f"{self.root}: split.json was not drawn for {made.relative_to(self.root)}: {', '.join(differ)} "
                "(copied from another run?)"
            )

    def check_checkpoint(self, state: dict[str, Any], which: str) -> None:
        """Refuse a checkpoint that was not trained with this run's config.yaml, split.json and composition.json."""
        path = self.checkpoint(which)
        self.check_pins(state.get("pins"), path, "train into a fresh --out")
        self._check_split_meta(checkpoint_config(state, path), path)
        if self.config.is_file():
            differ = recipe_differences(checkpoint_config(state, path), self.load_config())
            if differ:
                raise IrrepscopeError(
                    f"{self.root}: {path.relative_to(self.root)} was trained with another config than config.yaml: "
                    f"{', '.join(differ)} (edited, or copied from another run?)"
                )

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


def file_pin(path: Path) -> str:
    """A file's pin: the sha256 of its content (of its JSON data, for JSON: indentation is not content)."""
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            data = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode("utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # not JSON after all: its bytes are its content
    return hashlib.sha256(data).hexdigest()


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
