"""The sweep file: which configurations, which seeds, which overrides.

.. code-block:: yaml

    name: cpu_table2
    configs:                     # each entry: a config file (relative to this file) and/or overrides
      - {name: l01234_h16, config: ../configs/paper/l01234_h16.yaml}
      - {name: l03456_h16, config: ../configs/paper/l03456_h16.yaml, set: {train.batch_size: 16}}
    seeds: [0, 1, 2]             # train.seed of each run (fixes split, init and batch order)
    set:                         # overrides applied to every run
      data.limit: 6000
      train.epochs: 8
    grid:                        # optional: cartesian product of further overrides
      train.lr: [1.0e-3, 3.0e-3]

Every run is a plain run directory under ``SWEEP_DIR/runs/<config>[,key=value...]/seed<k>``;
runs are trained seed by seed (every configuration of the first seed first).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from irrepscope.config import Config, apply_overrides, config_from_dict, load_config, read_yaml
from irrepscope.errors import IrrepscopeError, shorten

SWEEP_KEYS = {"name", "configs", "seeds", "set", "grid", "description"}
CONFIG_KEYS = {"name", "config", "set"}


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its configuration name, seed, resolved config and directory."""

    config_name: str
    seed: int
    config: Config
    relpath: str  # relative to SWEEP_DIR

    @property
    def variant(self) -> str:
        return self.relpath.rsplit("/", 1)[0].split("/", 1)[1]


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    runs: list[RunSpec]


def _as_overrides(mapping: Any, where: str) -> list[str]:
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise IrrepscopeError(f"{where} must be a mapping of section.key: value")
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in mapping.items()]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "", text.replace(" ", ""))


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=,+-]*")  # a file name that stays in its folder (no /, no leading dot)


def check_name(name: Any, where: str) -> str:
    """A sweep's or a configuration's name: one plain file name, so its directory stays inside the sweep's."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise IrrepscopeError(
            f"{where}: name {shorten(name)} must be a plain file name (letters, digits, _ . = , + -; not starting with a dot, "
            "no /): it names a directory inside the sweep's"
        )
    return name


def load_sweep(path: str | Path, device: str | None = None) -> Sweep:
    """Read and validate a sweep file; every run's config is resolved and validated up front.

    ``device`` places every run (``train.device``) without editing the file: placement is
    not part of a run's recipe, so runs started elsewhere are resumed and reported alike.
    """
    path = Path(path)
    if device is not None:
        from irrepscope.training.evaluate import resolve_device

        resolve_device(device)  # refused now, not once per run
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise IrrepscopeError(f"{path}: a sweep file is a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise IrrepscopeError(f"{path}: unknown sweep key(s) {sorted(unknown)}; known: {sorted(SWEEP_KEYS)}")
    configs = raw.get("configs")
    if not isinstance(configs, list) or not configs:
        raise IrrepscopeError(f"{path}: 'configs' must be a non-empty list")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise IrrepscopeError(f"{path}: 'seeds' must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise IrrepscopeError(f"{path}: 'seeds' has duplicates")
    common = _as_overrides(raw.get("set"), f"{path}: 'set'")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise IrrepscopeError(f"{path}: 'grid' must map section.key to a non-empty list of values")
    grid_points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]

    runs: list[RunSpec] = []
    names = set()
    directories: dict[str, str] = {}  # case-folded variant directory -> the configuration (and grid point) that makes it
    for i, entry in enumerate(configs):
        where = f"{path}: configs[{i}]"
        if not isinstance(entry, dict):
            raise IrrepscopeError(f"{where} must be a mapping with keys {sorted(CONFIG_KEYS)}")
        bad = set(entry) - CONFIG_KEYS
        if bad:
            raise IrrepscopeError(f"{where}: unknown key(s) {sorted(bad)}; known: {sorted(CONFIG_KEYS)}")
        name = entry.get("name") or (Path(str(entry["config"])).stem if entry.get("config") else None)
        if not name:
            raise IrrepscopeError(f"{where}: needs a 'name' or a 'config'")
        if not isinstance(name, str):
            raise IrrepscopeError(f"{where}: 'name' must be text, got {shorten(name)}")
        if name in names:
            raise IrrepscopeError(f"{where}: duplicate configuration name {name!r}")
        names.add(name)
        config_file = entry.get("config")
        own = _as_overrides(entry.get("set"), f"{where}.set")
        for point in grid_points:
            point_overrides = _as_overrides(point, f"{path}: grid")
            label = ",".join([name, *point_overrides])
            variant = _slug(label)
            if not variant:
                raise IrrepscopeError(f"{where}: configuration name {name!r} has no character usable in a directory name")
            if not NAME.fullmatch(variant):  # '..' would lead out of runs/
                raise IrrepscopeError(
                    f"{where}: configuration name {shorten(label)} must give a plain directory name (letters, digits, "
                    f"_ . = , + -; not starting with a dot), not {shorten(variant)}"
                )
            # The slug drops characters (and case-insensitive file systems ignore case): two
            # configurations sharing a directory would train one model and report it twice.
            other = directories.setdefault(variant.casefold(), label)
            if other != label:
                raise IrrepscopeError(
                    f"{where}: configurations {other!r} and {label!r} would share the run directory runs/{variant}; rename one"
                )
            for seed in seeds:
                overrides = [*common, *own, *point_overrides, f"train.seed={seed}"]
                if device is not None:
                    overrides.append(f"train.device={device}")
                if config_file:
                    cfg_path = (path.parent / config_file).resolve()
                    if not cfg_path.is_file():
                        raise IrrepscopeError(f"{where}: config file not found: {cfg_path}")
                    config = load_config(cfg_path, overrides)
                else:
                    config = config_from_dict(apply_overrides({}, overrides), source=where)
                runs.append(RunSpec(name, seed, config, f"runs/{variant}/seed{seed}"))
    # Seed-major order: every configuration of seed k before any run of seed k+1, so that a
    # sweep stopped part-way already holds complete paired comparisons for its first seeds.
    runs.sort(key=lambda r: seeds.index(r.seed))
    return Sweep(check_name(str(raw.get("name") or path.stem), str(path)), path, runs)
