"""Energy- and force-labelled QM9 configurations off equilibrium, from GFN2-xTB molecular dynamics.

:func:`sample_md` runs short Langevin MD (ASE) of QM9 molecules driven by GFN2-xTB
(``tblite``, fully offline) and writes the sampled frames as extended XYZ with the xTB
total energy (eV) and forces (eV/Å) under ASE's standard ``energy`` and ``forces`` keys,
so ``ase.io.read(path, index=":")`` and :func:`irrepscope.data.xyz.read_extxyz` read them.

Two settings: a seeded random subset of QM9 molecules with a few frames each (many
chemistries), or one molecule (``qm9_index``) with many frames (the MD17 setting).

Reproducibility: each molecule's random stream is ``np.random.default_rng([seed,
qm9_index])`` (Maxwell-Boltzmann velocities and the Langevin noise), the subset is a
prefix of one seeded permutation (so a larger subset contains a smaller one for the same
seed), each molecule gets its own calculator, and everything runs on one thread; so a
molecule's frames depend neither on the worker count nor on which other molecules are in
the set, and the same call writes the same bytes (for the same tblite, ASE, numpy and zlib).

Resuming: finished molecules go to ``OUT.parts/`` beside the output, one file each, written
atomically, with ``manifest.json`` holding the parameters; a rerun with the same parameters
only computes the missing molecules. The work directory is removed once the output and its
sidecar ``OUT.json`` (parameters, counts, skipped molecules) are written.

``tblite`` is imported only when a molecule is computed (it is not a dependency of the
package; ``pip install tblite``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from irrepscope.atomic import atomic_write, atomic_write_json, atomic_write_text, remove_stale_temporaries
from irrepscope.data.md import MDSettings, langevin_positions
from irrepscope.data.structures import QM9_INDEX, Structures
from irrepscope.errors import IrrepscopeError, shorten
from irrepscope.process_state import environ_restored

METHOD = "GFN2-xTB"
FORMAT_VERSION = 1
DEFAULT_MOLECULES = 1000
MANIFEST = "manifest.json"
LOCK = ".lock"
# Environment for worker processes, in force before they load OpenMP/BLAS (threads fight, and change bits).
_ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class SampleResult:
    """What :func:`sample_md` wrote: the file, its frame count, the molecules in it and those skipped."""

    path: Path
    frames: int
    molecules: list[int]  # QM9 indices with frames in the file, in file order
    skipped: dict[int, str] = field(default_factory=dict)  # QM9 index -> why (SCF/MD failure)
    sidecar: Path | None = None


# --- QM9 access -------------------------------------------------------------------------------------


def _qm9_indices(mols: Structures) -> np.ndarray:
    """QM9 index of every QM9 structure (int64, ascending)."""
    return np.asarray(mols.properties[QM9_INDEX], dtype=np.int64)


def _qm9_geometry(mols: Structures, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers [n] and positions [n, 3] (Å) of structure ``i`` (copies: they travel to worker processes)."""
    z, pos = mols.structure(i)
    return np.array(z, dtype=np.int64), np.array(pos, dtype=np.float64)


# --- public entry point -----------------------------------------------------------------------------


def sample_md(
    out_path: str | os.PathLike,
    *,
    molecules: int | None = None,
    qm9_index: int | None = None,
    frames: int = 4,
    every: int = 40,
    equilibration: int = 100,
    temperature: float = 500.0,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> SampleResult:
    """Sample QM9 configurations by GFN2-xTB Langevin MD and write them, labelled, as extended XYZ.

    ``out_path``: ``*.extxyz.gz`` (gzip, deterministic header) or ``*.extxyz``.
    ``molecules``: a seeded random subset of this many QM9 molecules (default
    ``DEFAULT_MOLECULES`` = 1000 when ``qm9_index`` is not given either), each giving
    ``frames`` frames. ``qm9_index``: instead, the one molecule with this QM9 index.

    Per molecule: Maxwell-Boltzmann velocities at ``temperature`` (K), then zero total
    momentum and angular momentum, then Langevin MD (``timestep_fs``, ``friction_per_fs``,
    centre of mass fixed) on the GFN2-xTB surface. Frame ``k`` (0-based) is taken after
    ``equilibration + k * every`` steps. Its energy and forces are computed by a fresh
    calculator on the positions as written (rounded to 1e-8 Å), so they are a function of
    the written geometry alone, not of the SCF history of the trajectory.

    Every frame's ``atoms.info`` holds ``qm9_index``, ``temperature_K``, ``seed``, ``frame``,
    ``md_step`` and ``method``; molecules appear in ascending QM9 index. A molecule whose
    SCF or MD fails (tblite error, non-finite energy or forces) is left out and listed in
    the result's ``skipped`` and in the sidecar ``OUT.json``.

    Resumable (see the module docstring): an interrupted call, rerun with the same
    parameters, computes only the missing molecules and writes the same bytes; different
    parameters with a leftover work directory are an error. If the output and its sidecar
    already exist with the same parameters, nothing is computed. ``workers`` processes
    (spawned) work on molecules in parallel; the output does not depend on their number.
    """
    out = _check_out_path(out_path)
    settings = _check_settings(frames, every, equilibration, temperature, timestep_fs, friction_per_fs, seed)
    if not _is_int(workers) or workers < 1:
        raise IrrepscopeError(f"workers must be an integer >= 1, got {shorten(workers)}")
    if molecules is not None and qm9_index is not None:
        raise IrrepscopeError("give either molecules (a random subset) or qm9_index (one molecule), not both")

    from irrepscope.data.qm9 import load_qm9

    mols = load_qm9(progress=False)
    available = _qm9_indices(mols)
    positions = _select(available, molecules, qm9_index, seed)
    selection = [int(available[p]) for p in positions]
    params = _parameters(settings, qm9_index, selection)

    sidecar = Path(f"{out}.json")
    done = _finished_result(out, sidecar, params, selection)
    if done is not None:
        return done

    work = Path(f"{out}.parts")
    with _locked_work_dir(work):
        _check_manifest(work, params)
        todo = [(q, p) for q, p in zip(selection, positions) if not _part_exists(work, q)]
        tasks = [(q, *_qm9_geometry(mols, int(p)), settings) for q, p in todo]
        del mols
        single = qm9_index is not None
        desc = f"xTB MD of QM9 {qm9_index}" if single else "xTB MD"
        if single:
            total, initial = settings.frames, 0 if tasks else settings.frames
        else:
            total, initial = len(selection), len(selection) - len(tasks)
        unit = "frame" if single else "mol"
        with tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress) as bar:
            on_frame = (lambda: bar.update(1)) if single else None
            for q, text, error in _run_all(tasks, workers, on_frame):
                _write_part(work, q, text, error)
                if not single:
                    bar.update(1)
        result = _assemble(out, sidecar, work, selection, params)
    shutil.rmtree(work, ignore_errors=True)
    return result


# --- argument checks --------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_out_path(out_path: str | os.PathLike) -> Path:
    try:
        out = Path(out_path)
    except TypeError:
        raise IrrepscopeError(f"output path must be a path, got {shorten(out_path)}") from None
    if not (out.name.endswith(".extxyz.gz") or out.name.endswith(".extxyz")) or out.name.startswith("."):
        raise IrrepscopeError(f"output file must end in .extxyz.gz or .extxyz, got {shorten(str(out))}")
    if out.is_dir():
        raise IrrepscopeError(f"output {out} is a directory")
    return out


def _check_settings(
    frames: Any, every: Any, equilibration: Any, temperature: Any, timestep_fs: Any, friction_per_fs: Any, seed: Any
) -> MDSettings:
    counts = (("frames", frames, 1), ("every", every, 1), ("equilibration", equilibration, 0), ("seed", seed, 0))
    for name, value, low in counts:
        if not _is_int(value) or value < low:
            raise IrrepscopeError(f"{name} must be an integer >= {low}, got {shorten(value)}")
    # (name, value, must be > 0 rather than >= 0)
    reals = (
        ("temperature", temperature, True),
        ("timestep_fs", timestep_fs, True),
        ("friction_per_fs", friction_per_fs, False),
    )
    for name, value, strict in reals:
        if not _is_real(value) or not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise IrrepscopeError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {shorten(value)}")
    return MDSettings(
        frames=int(frames),
        every=int(every),
        equilibration=int(equilibration),
        temperature=float(temperature),
        timestep_fs=float(timestep_fs),
        friction_per_fs=float(friction_per_fs),
        seed=int(seed),
    )


def _select(available: np.ndarray, molecules: Any, qm9_index: Any, seed: int) -> list[int]:
    """Positions in QM9 (ascending) of the molecules to sample."""
    if qm9_index is not None:
        if not _is_int(qm9_index):
            raise IrrepscopeError(f"qm9_index must be an integer, got {shorten(qm9_index)}")
        p = int(np.searchsorted(available, qm9_index))
        if p >= len(available) or available[p] != qm9_index:
            span = f"{available[0]}..{available[-1]}"
            raise IrrepscopeError(f"qm9_index {qm9_index} is not in QM9 (indices {span}, with gaps)")
        return [p]
    n = DEFAULT_MOLECULES if molecules is None else molecules
    if not _is_int(n) or not 1 <= n <= len(available):
        raise IrrepscopeError(f"molecules must be an integer in 1..{len(available)}, got {shorten(n)}")
    # A prefix of one permutation: a larger subset contains a smaller one for the same seed.
    return sorted(int(p) for p in np.random.default_rng(seed).permutation(len(available))[: int(n)])


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("tblite", "ase", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            if package == "tblite":
                raise IrrepscopeError("GFN2-xTB labels need tblite: pip install tblite") from None
            versions[package] = "unknown"
    return versions


def _parameters(settings: MDSettings, qm9_index: int | None, selection: list[int]) -> dict[str, Any]:
    """Everything the output depends on (the manifest and the sidecar hold it)."""
    digest = hashlib.sha256(",".join(map(str, selection)).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "mode": "molecule" if qm9_index is not None else "subset",
        "molecules": len(selection),
        "qm9_index": None if qm9_index is None else int(qm9_index),
        "selection_sha256": digest,
        "frames": settings.frames,
        "every": settings.every,
        "equilibration": settings.equilibration,
        "temperature_K": settings.temperature,
        "timestep_fs": settings.timestep_fs,
        "friction_per_fs": settings.friction_per_fs,
        "seed": settings.seed,
        "versions": _versions(),
    }


# --- work directory ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked_work_dir(work: Path) -> Iterator[None]:
    """Create ``work`` and hold an exclusive lock on it (released by the OS on kill -9)."""
    import fcntl

    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise IrrepscopeError(f"cannot create the work directory {work}: {err.strerror}") from None
    with open(work / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise IrrepscopeError(f"another sampling is writing to {work}") from None
        remove_stale_temporaries(work)  # left by a writer killed mid-write; nobody else writes now
        yield


def _check_manifest(work: Path, params: dict[str, Any]) -> None:
    path = work / MANIFEST
    if not path.exists():
        if any(p.name != LOCK for p in work.iterdir()):
            raise IrrepscopeError(
                f"work directory {work} holds files but no {MANIFEST}: delete it or choose another output"
            )
        atomic_write_json(path, params)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IrrepscopeError(f"cannot read {path} ({err}): delete {work} to start over") from None
    if old != params:
        diff = ["all"]
        if isinstance(old, dict):
            diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        raise IrrepscopeError(
            f"work directory {work} belongs to a sampling with other parameters ({', '.join(diff)}): "
            f"rerun with those, delete {work}, or choose another output"
        )


def _part_names(q: int) -> tuple[str, str]:
    return f"{q:06d}.extxyz", f"{q:06d}.failed.json"


def _part_exists(work: Path, q: int) -> bool:
    return any((work / name).is_file() for name in _part_names(q))


def _write_part(work: Path, q: int, text: str | None, error: str | None) -> None:
    ok_name, failed_name = _part_names(q)
    if error is None:
        atomic_write_text(work / ok_name, text)
    else:
        atomic_write_json(work / failed_name, {"qm9_index": q, "error": error})


def _assemble(out: Path, sidecar: Path, work: Path, selection: list[int], params: dict[str, Any]) -> SampleResult:
    """Concatenate the parts in selection order into ``out`` and write the sidecar."""
    chunks, written, skipped = [], [], {}
    for q in selection:
        ok_name, failed_name = _part_names(q)
        if (work / ok_name).is_file():
            chunks.append((work / ok_name).read_bytes())
            written.append(q)
        else:
            skipped[q] = json.loads((work / failed_name).read_text())["error"]
    data = b"".join(chunks)
    n_frames = len(written) * params["frames"]

    def write(f: IO[bytes]) -> None:
        if out.name.endswith(".gz"):
            # No file name and mtime 0 in the header: the same data gives the same bytes.
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)

    atomic_write(out, write)
    atomic_write_json(
        sidecar,
        {
            "output": out.name,
            "parameters": params,
            "frames_written": n_frames,
            "molecules_written": len(written),
            "skipped": {str(q): why for q, why in skipped.items()},
        },
    )
    return SampleResult(out, n_frames, written, skipped, sidecar)


def _finished_result(out: Path, sidecar: Path, params: dict[str, Any], selection: list[int]) -> SampleResult | None:
    """The result of an earlier identical call whose output is complete, else None."""
    if not (out.is_file() and sidecar.is_file()) or Path(f"{out}.parts").exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        if meta.get("parameters") != params:
            return None
        skipped = {int(q): str(why) for q, why in meta["skipped"].items()}
        frames = int(meta["frames_written"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return SampleResult(out, frames, [q for q in selection if q not in skipped], skipped, sidecar)


# --- the computation --------------------------------------------------------------------------------


Task = tuple  # (qm9_index, z int64[n], pos float64[n, 3], MDSettings)


def _run_all(
    tasks: list[Task], workers: int, on_frame: Callable[[], None] | None
) -> Iterator[tuple[int, str | None, str | None]]:
    """``(qm9_index, extxyz text | None, error | None)`` per task, in completion order."""
    if not tasks:
        return
    workers = min(workers, len(tasks))
    if workers == 1:
        for task in tasks:
            yield _sample_molecule(task, on_frame)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # Spawned workers copy the environment when they start: one thread per worker from their first import on.
    # (A ProcessPoolExecutor, not a Pool: a worker that dies or cannot start is an error, not a silent respawn.)
    with environ_restored((), set_to=_ONE_THREAD_ENV):
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(_sample_molecule, task) for task in tasks]  # starts the workers
    try:
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool:
        raise IrrepscopeError("a worker process died (out of memory, or killed); rerun to resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Limit the OpenMP/BLAS libraries already loaded (tblite's included) to one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # then OMP_NUM_THREADS decides (workers set it)
        yield
        return
    with threadpool_limits(limits=1):
        yield


class _NonFinite(Exception):
    pass


def _sample_molecule(task: Task, on_frame: Callable[[], None] | None = None) -> tuple[int, str | None, str | None]:
    """Run one molecule's MD; its frames as extxyz text, or why it failed."""
    q, z, pos, settings = task
    try:
        from ase.calculators.calculator import CalculatorError
        from tblite.ase import TBLite  # loads the library before _one_thread limits it
    except ImportError as err:
        raise IrrepscopeError(f"GFN2-xTB labels need tblite and ase ({err}): pip install tblite") from None
    with _one_thread():
        try:
            frames = _trajectory_frames(q, z, pos, settings, TBLite, on_frame)
        except CalculatorError as err:  # tblite: SCF not converged, atoms too close, ...
            return q, None, _one_line(f"{type(err).__name__}: {err}")
        except _NonFinite as err:
            return q, None, str(err)
    return q, _to_extxyz(frames), None


def _one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:300]


def _trajectory_frames(q: int, z: np.ndarray, pos: np.ndarray, s: MDSettings, TBLite: type, on_frame) -> list:
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(numbers=z, positions=pos)
    atoms.calc = TBLite(method=METHOD, verbosity=0)
    frames = []
    for k, step, frame_pos in langevin_positions(atoms, s, np.random.default_rng([s.seed, q])):
        if not np.isfinite(frame_pos).all():
            raise _NonFinite(f"non-finite positions at MD step {step}")
        frame = Atoms(numbers=z, positions=frame_pos)
        energy, forces = _label(frame, TBLite)
        if not (math.isfinite(energy) and np.isfinite(forces).all()):
            raise _NonFinite(f"non-finite energy or forces at MD step {step}")
        frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
        frame.info.update(
            qm9_index=int(q), temperature_K=s.temperature, seed=s.seed, frame=k, md_step=step, method=METHOD
        )
        frames.append(frame)
        if on_frame is not None:
            on_frame()
    return frames


def _label(atoms: Any, TBLite: type) -> tuple[float, np.ndarray]:
    """GFN2-xTB total energy (eV) and forces (eV/Å) of ``atoms`` from a fresh calculator (no SCF restart)."""
    work = atoms.copy()
    work.calc = TBLite(method=METHOD, verbosity=0)
    return float(work.get_potential_energy()), np.array(work.get_forces(), dtype=np.float64)


def _to_extxyz(frames: list) -> str:
    import io

    import ase.io

    buffer = io.StringIO()
    ase.io.write(buffer, frames, format="extxyz")
    return buffer.getvalue()
