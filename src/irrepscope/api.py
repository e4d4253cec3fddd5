"""The public Python API: what a notebook user imports.

.. code-block:: python

    import irrepscope as irs

    run = irs.load_run("runs/demo")                 # model, config, split, QM9
    result = irs.analyze(run, max_molecules=500)    # order usage on the run's own test split
    result["unused_orders"], result["rows"][:3]

    irs.analyze_run("runs/demo")                    # the same, writing RUN_DIR/analysis/ (what the CLI does)

:func:`analyze` also takes any :class:`~irrepscope.analysis.interface.AnalysedModel`
(another family of equivariant network) with the molecules to evaluate it on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from irrepscope.analysis import bootstrap, potential
from irrepscope.analysis.interface import AnalysedModel
from irrepscope.analysis.own_model import OwnModel
from irrepscope.analysis.runner import SPLITS, _subset, analyze_model
from irrepscope.analysis.usage import check_count
from irrepscope.config import Config
from irrepscope.data.composition import unit_of
from irrepscope.data.sources import load_run_structures
from irrepscope.data.structures import ENERGY, QM9_INDEX, Structures
from irrepscope.data.split import load_split
from irrepscope.atomic import recover_directory
from irrepscope.errors import IrrepscopeError, shorten
from irrepscope.locks import lock_output, lock_run
from irrepscope.model.network import EquivariantGraphConv
from irrepscope.training.evaluate import model_from_checkpoint, resolve_device
from irrepscope.sweeps.runner import run_state
from irrepscope.sweeps.spec import Sweep
from irrepscope.training.runs import RunDir


@dataclass
class Run:
    """A trained run loaded for analysis: its model (evaluation mode), config, saved split and its structures."""

    root: Path
    model: EquivariantGraphConv
    config: Config
    split: dict[str, np.ndarray]
    mols: Structures
    checkpoint: str = "best"

    def analysed(self) -> OwnModel:
        """The model behind the analysis interface, on graphs built as it was trained."""
        return OwnModel(self.model, self.config.data.graph, self.config.model.cutoff)


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu", mols: Structures | None = None) -> Run:
    """Load a run directory's checkpoint, config and split (and its structures, unless ``mols`` is given)."""
    if checkpoint not in CHECKPOINTS:
        raise IrrepscopeError(f"checkpoint must be one of {CHECKPOINTS}, got {shorten(checkpoint)}")
    run = RunDir.at(_path(run_dir, "run_dir")).require()
    model, config, state = model_from_checkpoint(run.checkpoint(checkpoint), resolve_device(device))
    run.check_checkpoint(state, checkpoint)
    if not run.split.is_file():
        raise IrrepscopeError(f"{run.root} has no split.json; the analysis needs the run's own split")
    if mols is None:
        mols = load_run_structures(config.data, run.split)
    split = {k: np.asarray(v, dtype=np.int64) for k, v in load_split(run.split, len(mols)).items()}
    return Run(run.root, model, config, split, mols, checkpoint)


CHECKPOINTS = ("best", "last")


def _path(value: Any, what: str) -> Path:
    """A path argument of the API, refused clearly when it is not one (as the CLI would)."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise IrrepscopeError(f"{what} must be a path (str or pathlib.Path), got {shorten(value)}")
    return Path(value)


def split_indices(
    splits: dict[str, np.ndarray], split: str, max_molecules: int | None, seed: int, where: str | Path
) -> np.ndarray:
    """The molecules of one saved split, or a seeded random subset of ``max_molecules`` of them."""
    if split not in SPLITS:
        raise IrrepscopeError(f"unknown split {split!r}; choose one of {SPLITS}")
    max_molecules = check_count(max_molecules, "max_molecules")
    indices = np.asarray(splits[split], dtype=np.int64)
    if max_molecules is not None:
        # A seeded random subset: QM9 is ordered by size, so the first N of a split are its smallest molecules.
        indices = indices[_subset(len(indices), max_molecules, seed)]
    if len(indices) == 0:
        raise IrrepscopeError(f"the {split} split of {where} is empty (after --max-molecules)")
    return indices


def analyze(
    run: Run, split: str = "test", max_molecules: int | None = None, *, seed: int = 0, **options: Any
) -> dict[str, Any]:
    """Order usage of a loaded run on one of its own saved splits (a seeded subset with ``max_molecules``).

    ``options`` are :func:`analyze_model`'s (orders, embedding, map_molecules, probe_molecules,
    ablation_molecules, batch_size, threshold, progress). Returns usage.json's content plus
    the map arrays under ``_maps``; writes nothing.
    """
    if not isinstance(run, Run):
        raise IrrepscopeError(
            f"analyze takes a loaded run (irs.load_run(RUN_DIR)), got {shorten(run)}; irs.analyze_run(RUN_DIR) analyses a directory"
        )
    indices = split_indices(run.split, split, max_molecules, seed, run.root)
    with torch.inference_mode(False):
        result = analyze_model(
            run.analysed(), run.mols, indices, run.split["train"], target=run.config.data.target, seed=seed, **options
        )
    return {"run": str(run.root), "split": split, "checkpoint": run.checkpoint, **result}


def analyze_run(
    run_dir: str | Path,
    split: str = "test",
    max_molecules: int | None = None,
    *,
    checkpoint: str = "best",
    device: str = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """Analyse a run on its own saved split and write ``RUN_DIR/analysis/``; returns usage.json's content.

    ``options`` are :func:`analyze`'s.
    """
    from irrepscope.report.analysis import refuse_foreign_files, write_analysis

    t0 = time.perf_counter()
    root = _path(run_dir, "run_dir")
    with lock_run(root, "irrepscope analyze"):
        recover_directory(root / "analysis")  # leftovers of a killed analysis: the previous one stays
        refuse_foreign_files(root / "analysis")
        run = load_run(root, checkpoint, device)
        test = RunDir.at(run.root).read_test()  # refused if made from another best.pt
        result = analyze(run, split, max_molecules, **options)  # analyze_model checks --orders against the model
        result["pins"] = RunDir.at(run.root).pins(checkpoint)  # what prune and the sweep summary check it against
        return write_analysis(
            run.root / "analysis", result, run.config.to_yaml(), test, progress=options.get("progress", True), started=t0
        )


def _frame_keys(mols: Structures, indices: np.ndarray) -> set[bytes]:
    """One key per structure that a rigid motion or a reordering of its atoms does not change.

    Its sorted atomic numbers and the sorted list of (element pair, distance rounded to
    1e-4 Å) over all atom pairs: the same molecule translated, rotated, mirrored or with
    its atoms renumbered has the same key, another conformer or another molecule of the
    same formula does not.
    """
    keys = set()
    for i in indices:
        z, pos = mols.structure(int(i))
        a, b = np.triu_indices(len(z), k=1)
        d = np.round(np.linalg.norm(pos[a] - pos[b], axis=1), 4)
        lo, hi = np.minimum(z[a], z[b]), np.maximum(z[a], z[b])
        pairs = np.stack([lo.astype(np.float64), hi.astype(np.float64), d], axis=1)
        pairs = pairs[np.lexsort((pairs[:, 2], pairs[:, 1], pairs[:, 0]))]
        keys.add(np.sort(z).astype(np.int64).tobytes() + pairs.tobytes())
    return keys


def _check_disjoint(mols: Structures, train: np.ndarray, evaluated: np.ndarray) -> None:
    """Refuse analysed structures that are also training structures.

    The same frame in both files is refused, by geometry (:func:`_frame_keys`: also when
    translated, rotated or renumbered, with or without a ``qm9_index``); so is the same QM9
    molecule (``qm9_index``, where the files carry it) unless both files are frames of one
    single molecule (a trajectory split by frame, the MD17 setting).
    """
    same = len(_frame_keys(mols, train) & _frame_keys(mols, evaluated))
    if same:
        raise IrrepscopeError(f"{same} structures (the same geometry) are in both --molecules and --train-molecules")
    index = mols.properties[QM9_INDEX]
    shared = np.intersect1d(index[train], index[evaluated])
    shared = shared[shared >= 0]
    if len(shared) and len(np.unique(index[index >= 0])) > 1:
        raise IrrepscopeError(f"{len(shared)} molecules (by qm9_index) are in both --molecules and --train-molecules")


def analyze_nequip(
    model_path: str | Path,
    molecules: str | Path,
    split: str = "test",
    max_molecules: int | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Analyse a trained NequIP model (``.ckpt`` or ``.nequip.zip``) on QM9 with a run's split, or on a structure file.

    ``molecules`` is either an irrepscope run directory (its saved split, of which ``split``
    is analysed, and its target, which must be the energy in eV the model was trained on;
    ``irrepscope export`` writes the same molecules for ``nequip-train``) or a structure
    file (extxyz, ...) whose frames carry the energy under ``energy_key`` (and, for a
    force-trained model, the forces under ``forces_key``: then the forces are analysed too). A file needs
    ``train_molecules``, the file the model was trained on: the composition baseline and
    the probes are fitted on it, never on the analysed molecules. Writes ``out`` (default:
    ``analysis/`` beside the model) like ``analyze_run``; the other ``options`` are
    :func:`analyze_model`'s.
    """
    from irrepscope.analysis.nequip_model import NequIPModel

    return _analyze_model_file(NequIPModel.load, "NequIP", model_path, molecules, split, max_molecules, out, **options)


def analyze_mace(
    model_path: str | Path,
    molecules: str | Path,
    split: str = "test",
    max_molecules: int | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Analyse a trained MACE model (``NAME.model`` from ``mace_run_train``) like :func:`analyze_nequip`.

    The same ``molecules``: a run directory (its split and target; ``irrepscope export``
    wrote its molecules for ``mace_run_train``) or a structure file with ``train_molecules``.
    Needs ``irrepscope[mace]`` in MACE's environment (e3nn 0.4.4).
    """
    from irrepscope.analysis.mace_model import MaceModel

    return _analyze_model_file(MaceModel.load, "MACE", model_path, molecules, split, max_molecules, out, **options)


def _analyze_model_file(
    load: Callable[[Path], AnalysedModel],
    family: str,
    model_path: str | Path,
    molecules: str | Path,
    split: str = "test",
    max_molecules: int | None = None,
    out: str | Path | None = None,
    *,
    train_molecules: str | Path | None = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Another code's trained energy model (loaded by ``load``) on a run's split or a structure file; writes ``out``."""
    from irrepscope.data.xyz import read_extxyz
    from irrepscope.report.analysis import refuse_foreign_files, write_analysis

    t0 = time.perf_counter()
    model_path, molecules = _path(model_path, "model_path"), _path(molecules, "molecules")
    out_dir = _path(out, "out") if out is not None else model_path.parent / "analysis"
    with lock_output(out_dir, "irrepscope analyze"):
        recover_directory(out_dir)
        refuse_foreign_files(out_dir)  # before the work, not after it
        model = load(model_path)
        pins = None
        if Path(molecules).is_dir():
            if train_molecules is not None:
                raise IrrepscopeError("--train-molecules is for a structure file; a run brings its own training split")
            run = RunDir.at(molecules).require()
            run.check_checkpoints()  # they were trained on this split
            config = run.load_config()
            if unit_of(config.data.target) != "eV":
                raise IrrepscopeError(f"{run.root}'s target {config.data.target} is not an energy in eV, which {family} predicts")
            if not run.split.is_file():
                raise IrrepscopeError(f"{run.root} has no split.json")
            splits = load_split(run.split)
            indices = split_indices(splits, split, max_molecules, seed, run.root)
            train, target, source = np.asarray(splits["train"], dtype=np.int64), config.data.target, str(run.root)
            mols = load_run_structures(config.data, run.split)
            pins = run.pins()
        else:
            if train_molecules is None:
                raise IrrepscopeError(
                    f"analysing on the structure file {molecules} needs --train-molecules FILE (the molecules the model was "
                    "trained on: the composition baseline and the probes are fitted on them)"
                )
            if Path(train_molecules).resolve() == Path(molecules).resolve():
                raise IrrepscopeError("--molecules and --train-molecules are the same file: the probes would see the analysed molecules")
            mols, (train, evaluated) = read_extxyz([train_molecules, molecules], energy_key, forces_key, require_forces=False)
            _check_disjoint(mols, train, evaluated)
            indices = split_indices({"test": evaluated}, "test", max_molecules, seed, molecules)
            split, target, source = Path(molecules).name, ENERGY, str(molecules)
        with torch.inference_mode(False):
            result = analyze_model(model, mols, indices, train, target=target, seed=seed, progress=progress, **options)
        result = {"run": str(model_path), "split": split, "checkpoint": Path(model_path).name, "molecules": source, **result}
        if pins is not None:
            result["pins"] = pins
        text = f"{family} model {model_path}\nlayers: {model.block_names}\nirreps: {[str(i) for i in model.block_irreps]}\n"
        return write_analysis(out_dir, result, text, None, progress=progress, started=t0)


def analyze_sevenn(
    model: str | Path,
    structures: str | Path | list[str | Path],
    out: str | Path | None = None,
    *,
    modal: str | None = None,
    forces_key: str = "forces",
    max_structures: int | None = None,
    seed: int = 0,
    orders: list[int] | None = None,
    batch_size: int = 8,
    energy_threshold: float = potential.ENERGY_THRESHOLD,
    force_threshold: float = potential.FORCE_THRESHOLD,
    resamples: int = bootstrap.RESAMPLES,
    level: float = bootstrap.LEVEL,
    progress: bool = True,
) -> dict[str, Any]:
    """Which orders carry a SevenNet model's energies and forces, measured against itself; writes ``out``.

    ``model``: a shipped pretrained name (``7net-0``, ``7net-0_22May2024``, ``7net-l3i5``,
    ``7net-mf-0`` with ``modal``) or a SevenNet checkpoint (``.pth``). ``structures``: one or
    more structure files (extxyz, with or without cells; forces under ``forces_key`` are used
    where every frame has them) or shipped sets by name (``qm9_xtb``, ``crystals``); of each, a
    seeded subset of at most ``max_structures``. ``out`` defaults to ``runs/sevenn/MODEL/analysis``
    (beside a checkpoint file: its ``analysis/``). Returns usage.json's content.
    """
    from irrepscope.analysis.sevenn_model import SevenNetModel
    from irrepscope.data.sources import SHIPPED_SOURCES, source_path
    from irrepscope.data.xyz import read_extxyz
    from irrepscope.report.potential import write_potential_analysis

    t0 = time.perf_counter()
    names = [structures] if isinstance(structures, (str, Path)) else list(structures)
    if not names:
        raise IrrepscopeError("no structures given: name a structure file or a shipped set (qm9_xtb, crystals)")
    paths = []
    for name in names:
        text = str(_path(name, "structures"))
        if text not in SHIPPED_SOURCES and not Path(text).expanduser().is_file():
            raise IrrepscopeError(f"structures {shorten(text)}: no such structure file (nor a shipped set: {', '.join(SHIPPED_SOURCES)})")
        paths.append(source_path(text))
    check_count(max_structures, "max_structures")
    model_text = str(_path(model, "model"))
    out_dir = (
        _path(out, "out") if out is not None
        else Path(model_text).parent / "analysis" if model_text.endswith(".pth")
        else Path("runs") / "sevenn" / model_text / "analysis"
    )  # fmt: skip
    with lock_output(out_dir, "irrepscope analyze"):
        recover_directory(out_dir)
        from irrepscope.report.analysis import refuse_foreign_files

        refuse_foreign_files(out_dir)  # before the work, not after it
        seven = SevenNetModel.load(model_text, modal=modal)
        mols, per_file = read_extxyz(paths, energy_key=None, forces_key=forces_key)
        # at most max_structures of each source, so that a small set is not drowned by a large one
        indices = np.concatenate([own[_subset(len(own), max_structures, seed)] for own in per_file]).astype(np.int64)
        with torch.inference_mode(False):
            result = potential.analyze_potential(
                seven, mols, indices, orders=orders, batch_size=batch_size, energy_threshold=energy_threshold,
                force_threshold=force_threshold, progress=progress, resamples=resamples, level=level, seed=seed,
            )  # fmt: skip
        result = {"model": model_text, "modal": modal, "structures": ", ".join(map(str, names)), "seed": seed, **result}
        return write_potential_analysis(out_dir, result, started=t0)


def analysis_current(run_dir: Path) -> bool:
    """Whether the run has an analysis made from the files it holds now (its best.pt, split, composition)."""
    from irrepscope.sweeps.prune import read_usage, usage_is_current, usage_path

    if not usage_path(run_dir).is_file():
        return False
    try:
        usage = read_usage(run_dir)
    except IrrepscopeError:  # unreadable: redo it
        return False
    return usage_is_current(run_dir, usage)


def analyze_sweep(sweep: Sweep, out_dir: str | Path, progress: bool = True) -> int:
    """Run ``irrepscope analyze`` (default settings, test split) on every finished run without a current analysis.

    Resumable like the training: a run whose analysis was made from its present best.pt is
    skipped; one made from an earlier best.pt (the sweep was extended) is redone. Returns
    how many runs were analysed now.
    """
    out = Path(out_dir)
    todo = [
        s for s in sweep.runs
        if run_state(out / s.relpath, s.config.train.epochs) == "finished" and not analysis_current(out / s.relpath)
    ]  # fmt: skip
    for spec in tqdm(todo, desc=f"analyse {sweep.name}", unit="run", disable=not progress):
        analyze_run(out / spec.relpath, device=spec.config.train.device, progress=False)  # where it trained
    return len(todo)


__all__ = [
    "AnalysedModel", "OwnModel", "Run", "analyze", "analyze_mace", "analyze_model", "analyze_nequip", "analyze_run",
    "analyze_sevenn", "analyze_sweep", "load_run",
]  # fmt: skip
