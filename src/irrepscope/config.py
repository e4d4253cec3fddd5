"""Run configuration: plain YAML mapped onto dataclasses, validated at the boundary.

A config has three sections, ``model``, ``data`` and ``train``; every key has a
default, unknown keys are errors (a typo must not silently fall back to a default),
and ``--set section.key=value`` overrides are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from irrepscope.errors import IrrepscopeError, shorten
from irrepscope.orders import tensor_product_weights, validate_orders

BACKENDS = ("e3nn", "fast")
# Refused before anything is allocated: 2e9 float32 parameters are 8 GB before gradients
# and optimiser state (x4); the brief's largest model has 3.7 M.
MAX_PARAMETERS = 2_000_000_000
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds; also what a YAML integer can sensibly hold
MIN_ELEMENTS = 10  # the embedding is indexed by atomic number: QM9's fluorine is Z = 9
GRAPHS = ("bond", "radius")
REFERENCES = ("auto", "per_element", "none")
SCHEDULES = ("none", "cosine", "plateau")

# Keys added after the first release, with the value that reproduces how runs written
# before them behaved. A run's own config.yaml and a checkpoint's embedded config are
# always fully resolved, so a key missing there means the run predates it.
LEGACY_VALUES: dict[str, dict[str, Any]] = {
    "model": {"radial_envelope": "none"},
    "data": {"reference": "none", "source": "qm9", "energy_key": "energy", "forces_key": "forces", "group_by": "auto"},
    "train": {
        "warmup_epochs": 0.0, "ema_decay": None, "plateau_patience": 2, "plateau_factor": 0.5,
        "energy_weight": 1.0, "force_weight": 0.0,
    },
}  # fmt: skip
GROUPINGS = ("auto", "structure", "qm9_index")


@dataclass
class ModelConfig:
    """Architecture of the reference model (see the brief): defaults reproduce [0,1,2]/H=32."""

    orders: list[int] = field(default_factory=lambda: [0, 1, 2])
    hidden_mul: int = 32  # H: copies of every order in the hidden features
    num_blocks: int = 5  # tensor-product blocks, the first one reads the 64x0e embedding
    num_basis: int = 20  # Bessel radial functions
    cutoff: float = 6.0  # Å; bounds the radial basis (and the radius graph)
    embedding_dim: int = 64
    num_elements: int = 100
    radial_hidden: int | None = None  # hidden width of the radial MLP; None means hidden_mul
    aggregation_norm: float = 6.08  # messages are summed and divided by this constant
    backend: str = "fast"  # tensor-product implementation: e3nn (reference) or fast
    radial_envelope: str = "none"  # none (published: Bessel basis cut by a step) | polynomial (smooth, as NequIP)

    def validate(self) -> None:
        from irrepscope.model.radial import ENVELOPES

        self.orders = validate_orders(self.orders)
        _positive_int(self, "hidden_mul", "num_blocks", "num_basis", "embedding_dim", "num_elements")
        if self.radial_hidden is not None:
            _positive_int(self, "radial_hidden")
        _positive_float(self, "cutoff", "aggregation_norm")
        if self.backend not in BACKENDS:
            raise IrrepscopeError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.radial_envelope not in ENVELOPES:
            raise IrrepscopeError(f"model.radial_envelope must be one of {ENVELOPES}, got {shorten(self.radial_envelope)}")
        if self.num_elements < MIN_ELEMENTS:
            raise IrrepscopeError(
                f"model.num_elements must be at least {MIN_ELEMENTS} (atoms are embedded by atomic number; F is 9), "
                f"got {self.num_elements}"
            )
        n = self.parameter_count()
        if n > MAX_PARAMETERS:
            raise IrrepscopeError(
                f"this model would have {n:.3g} parameters ({4 * n / 1e9:.3g} GB in float32 before gradients and "
                f"optimiser state); the limit is {MAX_PARAMETERS:.0e}: lower model.hidden_mul or the orders"
            )

    def parameter_count(self) -> int:
        """The model's exact parameter count, computed without building it."""
        radial = self.radial_hidden or self.hidden_mul
        total = self.num_elements * self.embedding_dim + self.hidden_mul  # embedding + readout (0e -> 0e)
        for block in range(self.num_blocks):
            in_orders, mul_in = ([0], self.embedding_dim) if block == 0 else (self.orders, self.hidden_mul)
            weights = tensor_product_weights(in_orders, mul_in, self.orders, self.hidden_mul)
            total += self.num_basis * radial + radial * weights  # radial MLP, no biases
        return total


@dataclass
class DataConfig:
    """Which data, target, graph and split."""

    # qm9 (the qm9pack wheel), qm9_xtb (the shipped GFN2-xTB molecular dynamics set) or the path
    # of a structure file (extxyz, ...; relative to the working directory) with energies and forces.
    source: str = "qm9"
    energy_key: str = "energy"  # structure files: the frames' energy (eV)
    forces_key: str = "forces"  # structure files: the frames' per-atom forces (eV/Å), read where present
    # What the split keeps together: auto = frames of one QM9 molecule (qm9_index) when a file
    # has several molecules, else each structure; structure; qm9_index.
    group_by: str = "auto"
    target: str = "U0_atomization"
    graph: str = "bond"  # covalent-bond graph (as published) or radius graph within model.cutoff
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    limit: int | None = None  # use a seeded random subset of this many molecules
    cache_dir: str | None = None  # None: $IRREPSCOPE_CACHE or ~/.cache/irrepscope
    # Per-element reference subtracted before standardising (fitted on the training split):
    # auto = per_element for extensive targets (energies...), none for intensive ones.
    reference: str = "auto"
    # Multi-task: vector/tensor targets predicted by extra heads on the same trunk
    # (charge_dipole, charge_quadrupole); data.target stays the one evaluated and analysed.
    auxiliary: list[str] = field(default_factory=list)

    @property
    def from_qm9(self) -> bool:
        return self.source == "qm9"

    def validate(self) -> None:
        from irrepscope.data.composition import is_extensive
        from irrepscope.data.multipoles import EQUIVARIANT_TARGETS, is_equivariant
        from irrepscope.data.qm9 import PROPERTIES
        from irrepscope.data.structures import ENERGY

        for name in ("source", "energy_key", "forces_key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise IrrepscopeError(f"data.{name} must be a non-empty string, got {shorten(value)}")
        if self.group_by not in GROUPINGS:
            raise IrrepscopeError(f"data.group_by must be one of {GROUPINGS}, got {shorten(self.group_by)}")
        if not self.from_qm9:
            if self.target != ENERGY:
                raise IrrepscopeError(
                    f"data.target must be {ENERGY!r} for the structures of data.source {shorten(self.source)} "
                    f"(their energies, eV), got {shorten(self.target)}"
                )
        elif not isinstance(self.target, str) or (self.target not in PROPERTIES and not is_equivariant(self.target)):
            known = sorted(PROPERTIES) + sorted(EQUIVARIANT_TARGETS)
            raise IrrepscopeError(f"data.target {shorten(self.target)} is unknown; choose one of {known}")
        if self.graph not in GRAPHS:
            raise IrrepscopeError(f"data.graph must be one of {GRAPHS}, got {self.graph!r}")
        if not isinstance(self.split, list) or len(self.split) != 3:
            raise IrrepscopeError(f"data.split must be three fractions [train, val, test], got {self.split!r}")
        if any(not isinstance(x, (int, float)) or x <= 0 for x in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise IrrepscopeError(f"data.split fractions must be positive and sum to 1, got {self.split}")
        if self.limit is not None:
            _positive_int(self, "limit")
        if self.reference not in REFERENCES:
            raise IrrepscopeError(f"data.reference must be one of {REFERENCES}, got {self.reference!r}")
        if not isinstance(self.auxiliary, list) or not all(isinstance(a, str) for a in self.auxiliary):
            raise IrrepscopeError(f"data.auxiliary must be a list of target names, got {shorten(self.auxiliary)}")
        for name in self.auxiliary:
            if not is_equivariant(name):
                raise IrrepscopeError(
                    f"data.auxiliary: {shorten(name)} is not a vector/tensor target; choose from {sorted(EQUIVARIANT_TARGETS)}"
                )
        if self.auxiliary and not self.from_qm9:
            raise IrrepscopeError("data.auxiliary heads are QM9's charge multipoles: they need data.source: qm9")
        if len(set(self.auxiliary)) != len(self.auxiliary) or self.target in self.auxiliary:
            raise IrrepscopeError(f"data.auxiliary {self.auxiliary} repeats a target (or data.target {self.target})")
        if self.reference == "auto":
            self.reference = "per_element" if is_extensive(self.target) else "none"
        elif self.reference == "per_element" and not is_extensive(self.target):
            kind, why = (
                ("vector/tensor", "a per-element constant cannot point anywhere")
                if is_equivariant(self.target)
                else ("intensive", "it does not grow with the number of atoms")
            )
            raise IrrepscopeError(f"data.reference: per_element makes no sense for the {kind} target {self.target!r} ({why}); use none")


@dataclass
class TrainConfig:
    """Optimisation recipe; defaults are the published one (AdamW, lr 1e-3, no schedule, batch 32)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's default
    schedule: str = "none"  # none | cosine | plateau (halve the lr when validation stalls)
    warmup_epochs: float = 0.0  # linear learning-rate warm-up over this many epochs
    # Exponential moving average of the weights (what is validated, saved and evaluated); null = off.
    # 0.99 is the default for new configs: measured better than none on every seed (README "Training recipes").
    ema_decay: float | None = 0.99
    plateau_patience: int = 2  # plateau: epochs without a new best validation MAE before lowering the lr
    plateau_factor: float = 0.5  # plateau: multiply the lr by this
    seed: int = 0  # fixes the split, the initial weights and the batch order
    device: str = "cpu"  # cpu, cuda, cuda:1, ... or auto
    dtype: str = "float32"  # float32 | float64
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    eval_batch_size: int = 128
    max_train_batches: int | None = None  # cap on batches per epoch (quick experiments)
    auxiliary_weight: float = 1.0  # weight of each data.auxiliary head's standardised MSE (the target's is 1)
    # Force fields: loss = energy_weight x MSE of the standardised energy + force_weight x MSE of the force
    # components over the training forces' RMS. Forces are -dE/dpositions of the predicted energy.
    energy_weight: float = 1.0
    force_weight: float = 0.0
    # Fine-tuning: start the embedding and blocks from this run's best.pt (same architecture;
    # heads and statistics fresh). "{seed}" in the path becomes train.seed.
    init_from: str | None = None

    def validate(self) -> None:
        _positive_int(self, "epochs", "batch_size", "eval_batch_size")
        _positive_float(self, "lr")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise IrrepscopeError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise IrrepscopeError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _number_where(self, "warmup_epochs", lambda v: 0 <= v < math.inf, "a number >= 0")
        if self.ema_decay is not None:
            _number_where(self, "ema_decay", lambda v: 0 < v < 1, "null or a number in (0, 1)")
        _positive_int(self, "plateau_patience")
        _number_where(self, "plateau_factor", lambda v: 0 < v < 1, "a number in (0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise IrrepscopeError(f"train.seed must be an integer in [0, {MAX_SEED}], got {shorten(self.seed)}")
        if self.dtype not in ("float32", "float64"):
            raise IrrepscopeError(f"train.dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("threads", "max_train_batches"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        _number_where(self, "auxiliary_weight", lambda v: 0 <= v < math.inf, "a number >= 0")
        for name in ("energy_weight", "force_weight"):
            _number_where(self, name, lambda v: 0 <= v < math.inf, "a number >= 0")
        if self.energy_weight == 0 and self.force_weight == 0:
            raise IrrepscopeError("train.energy_weight and train.force_weight are both 0: nothing to learn")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise IrrepscopeError(f"train.init_from must be a run directory or null, got {shorten(self.init_from)}")


@dataclass
class Config:
    """A whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        from irrepscope.data.multipoles import target_order

        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.train.force_weight > 0:
            check_force_field(self)
        for name in [self.data.target, *self.data.auxiliary]:
            l = target_order(name)
            if l not in self.model.orders:
                raise IrrepscopeError(
                    f"{name} is order l={l}, but model.orders {self.model.orders} lacks {l}: "
                    f"the readout maps the last block's l={l} features to it"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_force_field(config: Config) -> None:
    """Training on forces needs a predicted energy that is a smooth function of the positions.

    A radius graph with the polynomial envelope is (every edge enters and leaves at the
    cutoff with zero weight, zero slope and zero curvature). A bond graph is not: it is
    re-perceived from each geometry, so an edge appears or vanishes with a jump in the
    energy when a distance crosses the bond rule, and non-bonded atoms exert no force at
    all. The Bessel basis alone is cut by a step in its derivative at the cutoff.
    """
    if config.data.target != "energy":
        raise IrrepscopeError(
            f"training on forces needs data.target: energy from a structure file with forces (data.source), "
            f"got {shorten(config.data.target)}"
        )
    if config.data.graph != "radius" or config.model.radial_envelope != "polynomial":
        raise IrrepscopeError(
            "training on forces needs data.graph: radius and model.radial_envelope: polynomial (a smooth energy; "
            f"got graph {config.data.graph}, envelope {config.model.radial_envelope}): bond graphs jump when a bond "
            "is perceived or lost"
        )
    if config.data.auxiliary:
        raise IrrepscopeError("data.auxiliary heads are QM9 charge targets; they do not combine with training on forces")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build and validate a :class:`Config` from a nested mapping; unknown keys are errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise IrrepscopeError(f"{source}: top level must be a mapping with sections {list(SECTIONS)}")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise IrrepscopeError(f"{source}: unknown section {name!r}; expected one of {list(SECTIONS)}")
        cls = SECTIONS[name]
        value = value or {}
        if not isinstance(value, dict):
            raise IrrepscopeError(f"{source}: section {name!r} must be a mapping")
        known = {f.name for f in fields(cls)}
        for key in value:
            if key not in known:
                raise IrrepscopeError(f"{source}: unknown key {name}.{key}; known keys: {sorted(known)}")
        sections[name] = cls(**{k: _coerce_float(cls, k, v) for k, v in value.items()})
    return Config(**sections).validate()


# Where and how fast a run computes, not what it computes: may change between invocations.
PLACEMENT_KEYS = frozenset({"train.device", "train.threads"})


def recipe_differences(recorded: Config, wanted: Config) -> list[str]:
    """``section.key (run: a, now: b)`` for every key where a run's recorded config and ``wanted`` differ.

    What continuing a run may change is no difference: a larger ``train.epochs`` (the run
    is extended), ``train.device`` and ``train.threads``.
    """
    old, new = recorded.to_dict(), wanted.to_dict()
    out = []
    for section, values in new.items():
        for key, value in values.items():
            name, before = f"{section}.{key}", old[section][key]
            if before == value or name in PLACEMENT_KEYS or (name == "train.epochs" and value > before):
                continue
            out.append(f"{name} (run: {shorten(before)}, now: {shorten(value)})")
    return out


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), run_record: bool = False
) -> Config:
    """Read a YAML config file, apply ``section.key=value`` overrides, validate.

    ``run_record``: the file is a run's own resolved config.yaml, so keys it lacks take
    their :data:`LEGACY_VALUES` (the run predates them) rather than today's defaults.
    """
    path = Path(path)
    raw = read_yaml(path, "config file")
    if run_record:
        raw = with_legacy_values(raw)
    return config_from_dict(apply_overrides(raw, overrides), source=str(path))


def with_legacy_values(raw: Any) -> Any:
    """A copy of a run's recorded config with every key added since it was written set to its legacy value."""
    if not isinstance(raw, dict):
        return raw
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, values in LEGACY_VALUES.items():
        if isinstance(out.get(section), dict):
            for key, value in values.items():
                out[section].setdefault(key, value)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)} (each key once per mapping)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys: every config, sweep file and --set value is read with it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; a missing file or malformed YAML is a one-line error naming ``what``."""
    if not path.is_file():
        raise IrrepscopeError(f"{what} not found: {path}")
    try:
        return safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise IrrepscopeError(f"{path}: not UTF-8 text (byte {exc.start}): is it a YAML file?") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise IrrepscopeError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Return a copy of the raw mapping with ``section.key=value`` overrides applied."""
    if not overrides:
        return raw
    if raw is not None and not isinstance(raw, dict):
        raise IrrepscopeError("cannot apply --set to a config whose top level is not a mapping")
    for name, section in (raw or {}).items():
        if section is not None and not isinstance(section, dict):
            raise IrrepscopeError(f"cannot apply --set: section {shorten(name)} is not a mapping but {shorten(section)}")
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise IrrepscopeError(f"--set expects section.key=value, got {item!r}")
        try:
            value = safe_load(text)
        except yaml.YAMLError:
            raise IrrepscopeError(f"--set {item!r}: value is not valid YAML") from None
        raw.setdefault(parts[0], {})
        if not isinstance(raw[parts[0]], dict):
            raise IrrepscopeError(f"--set {item!r}: section {parts[0]!r} is not a mapping")
        raw[parts[0]][parts[1]] = value
    return raw


def _coerce_float(cls: type, key: str, value: Any) -> Any:
    # YAML 1.1 reads "1e-3" (no dot) as a string; accept it where a float is expected.
    annotation = str(cls.__dataclass_fields__[key].type)
    if isinstance(value, str) and annotation.startswith("float"):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _positive_int(obj: Any, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise IrrepscopeError(f"{section}.{name} must be a positive integer, got {v!r}")


def _number_where(obj: Any, name: str, ok: Callable[[float], bool], what: str) -> None:
    """A one-line error unless ``obj.name`` is a number (not a bool) for which ``ok`` holds (NaN never does)."""
    section = type(obj).__name__.replace("Config", "").lower()
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
        raise IrrepscopeError(f"{section}.{name} must be {what}, got {shorten(v)}")


def _positive_float(obj: Any, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise IrrepscopeError(f"{section}.{name} must be a positive number, got {v!r}")
