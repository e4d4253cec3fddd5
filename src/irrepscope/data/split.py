"""Seeded random train/val/test splits, saved next to a run so that analysis reuses them.

A split file is the single source of truth for "the held-out set": analysis must load
it rather than re-split with some other seed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from irrepscope.atomic import atomic_write_json
from irrepscope.errors import IrrepscopeError

SPLIT_NAMES = ("train", "val", "test")
_FORMAT = "irrepscope-split"
_VERSION = 1


def random_split(
    n: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    limit: int | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split ``range(n)`` at random into sorted, disjoint ``train``/``val``/``test`` index arrays.

    With ``limit``, a seeded random subset of ``limit`` items is drawn first and split.
    With ``groups`` (one label per index), the groups are what is drawn and split (and
    what ``limit`` counts): all indices of a group land in the same part, e.g. every
    frame of one molecule's trajectory. The same arguments always give the same split.
    """
    if groups is not None:
        labels, inverse = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
        if len(inverse) != n:
            raise IrrepscopeError(f"groups must hold one label per item ({n}), got {len(inverse)}")
        by_group = random_split(len(labels), fractions, seed, limit)
        return {name: np.flatnonzero(np.isin(inverse, part)).astype(np.int64) for name, part in by_group.items()}
    if not _is_int(n) or n <= 0:
        raise IrrepscopeError(f"cannot split {n!r} molecules: need a positive count")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise IrrepscopeError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if limit is not None and (not _is_int(limit) or not 0 < limit <= n):
        raise IrrepscopeError(f"limit must be an integer in [1, {n}], got {limit!r}")
    rng = np.random.default_rng(seed)
    pool = np.arange(n, dtype=np.int64) if limit is None else rng.choice(n, size=int(limit), replace=False)
    perm = rng.permutation(pool)
    m = len(perm)
    # Cumulative rounding: sizes add up to m exactly and each is within 1 of its share.
    b1, b2 = round(fr[0] * m), round((fr[0] + fr[1]) * m)
    parts = dict(zip(SPLIT_NAMES, (perm[:b1], perm[b1:b2], perm[b2:])))
    empty = [name for name, idx in parts.items() if len(idx) == 0]
    if empty:
        raise IrrepscopeError(f"split of {m} molecules with fractions {fr} leaves {', '.join(empty)} empty")
    return {name: np.sort(idx).astype(np.int64) for name, idx in parts.items()}


def save_split(path: str | os.PathLike, split: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``split`` and ``meta`` (seed, fractions, limit, dataset size, ...) as JSON, atomically."""
    _check(split, Path(path))
    doc = {
        "format": _FORMAT,
        "version": _VERSION,
        "meta": meta,
        **{name: [int(i) for i in split[name]] for name in SPLIT_NAMES},
    }
    return atomic_write_json(path, doc)


def load_split(path: str | os.PathLike, n: int | None = None) -> dict[str, np.ndarray]:
    """Read and validate a split file; with ``n``, also check every index is below ``n``."""
    path = Path(path)
    split = {name: np.asarray(_read(path)[name], dtype=np.int64) for name in SPLIT_NAMES}
    _check(split, path, n)
    return split


def load_split_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dictionary stored with a split."""
    meta = _read(Path(path)).get("meta")
    if not isinstance(meta, dict):
        raise IrrepscopeError(f"split file {path} has no meta dictionary")
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IrrepscopeError(f"split file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IrrepscopeError(f"split file {path} is corrupt: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != _VERSION:
        raise IrrepscopeError(f"{path} is not an irrepscope split file (format {_FORMAT} v{_VERSION})")
    for name in SPLIT_NAMES:
        values = doc.get(name)
        if not isinstance(values, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
            raise IrrepscopeError(f"split file {path}: {name!r} must be a list of integers")
    return doc


def _check(split: dict[str, np.ndarray], path: Path, n: int | None = None) -> None:
    """Non-empty, non-negative, duplicate-free and disjoint index arrays (below ``n`` if given)."""
    if set(split) != set(SPLIT_NAMES):
        raise IrrepscopeError(f"split for {path} must have exactly the keys {SPLIT_NAMES}, got {sorted(split)}")
    parts = [np.asarray(split[name]).reshape(-1) for name in SPLIT_NAMES]
    for name, idx in zip(SPLIT_NAMES, parts):
        if len(idx) == 0:
            raise IrrepscopeError(f"split {path}: {name} is empty")
        if idx.min() < 0 or (n is not None and idx.max() >= n):
            raise IrrepscopeError(f"split {path}: {name} has indices outside [0, {n if n is not None else 'n'})")
    joined = np.concatenate(parts)
    if len(np.unique(joined)) != len(joined):
        raise IrrepscopeError(f"split {path}: train/val/test overlap or repeat indices")
