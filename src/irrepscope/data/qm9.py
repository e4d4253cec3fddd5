"""QM9 (130,831 molecules) read from the CSV files shipped in the ``qm9pack`` wheel.

The CSVs are parsed once (a few seconds), bonds are perceived from the geometry, and
the result is cached as one uncompressed ``.npz`` that loads in well under a second.
The cache carries a fingerprint of the source files' content (size and hashes) and of
``PARSER_VERSION``; any mismatch, or a cache that cannot be read, triggers a re-parse.

``qm9pack`` itself is never imported (its ``__init__`` needs ``pkg_resources``); only
its data folder is located.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import IO, Iterable

import numpy as np
from tqdm import tqdm

from irrepscope.atomic import atomic_write
from irrepscope.data.graphs import covalent_bonds_many
from irrepscope.data.structures import MULLIKEN, QM9_INDEX, SMILES, Structures, pointer
from irrepscope.errors import IrrepscopeError

# Bump whenever parsing, bond perception or the cache layout changes: old caches are rebuilt.
PARSER_VERSION = 1

HARTREE_TO_EV = 27.211386
QM9_SIZE = 130_831
SOURCE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
POLARIZABILITY_FILE = "qm9_polarizability.csv"
CACHE_NAME = "qm9.npz"

# Free-atom reference energies (Hartree) of the QM9 atomref table, per thermodynamic quantity.
ATOM_REF_U0_HARTREE = {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730}
ATOM_REF_HARTREE: dict[str, dict[int, float]] = {
    "U0": ATOM_REF_U0_HARTREE,
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063163, 9: -99.717314},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062219, 9: -99.716370},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079532, 9: -99.733544},
}

PROPERTIES: dict[str, tuple[str, str]] = {
    "U0_atomization": ("eV", "internal energy at 0 K minus the free-atom U0 references"),
    "U_atomization": ("eV", "internal energy at 298 K minus the free-atom U references"),
    "H_atomization": ("eV", "enthalpy at 298 K minus the free-atom H references"),
    "G_atomization": ("eV", "free energy at 298 K minus the free-atom G references"),
    "U0": ("eV", "total internal energy at 0 K"),
    "homo": ("eV", "energy of the highest occupied molecular orbital"),
    "lumo": ("eV", "energy of the lowest unoccupied molecular orbital"),
    "gap": ("eV", "LUMO - HOMO gap"),
    "dipole": ("Debye", "dipole moment magnitude"),
    "polarizability": ("bohr^3", "isotropic polarizability"),
    "r2": ("bohr^2", "electronic spatial extent"),
    "zpve": ("eV", "zero-point vibrational energy"),
    "cv": ("cal/mol/K", "heat capacity at 298 K"),
    "rot_a": ("GHz", "rotational constant A"),
    "rot_b": ("GHz", "rotational constant B"),
    "rot_c": ("GHz", "rotational constant C"),
}

_SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}

# CSV column -> (property name, factor to the unit in PROPERTIES); energies are Hartree.
_SCALAR_COLUMNS = {
    "RotA_GHz": ("rot_a", 1.0),
    "RotB_GHz": ("rot_b", 1.0),
    "RotC_GHz": ("rot_c", 1.0),
    "Dipole_debye": ("dipole", 1.0),
    "Polarizability_bohr3": ("polarizability", 1.0),
    "HOMO_au": ("homo", HARTREE_TO_EV),
    "LUMO_au": ("lumo", HARTREE_TO_EV),
    "HOMO_LUMO_gap_au": ("gap", HARTREE_TO_EV),
    "R2_bohr2": ("r2", 1.0),
    "ZPVE_au": ("zpve", HARTREE_TO_EV),
    "Heatcapacity_Cv_cal_mol_K": ("cv", 1.0),
}
_ENERGY_COLUMNS = {
    "InternalEnergy_0K_au": "U0",
    "InternalEnergy_298K_au": "U",
    "Enthalphy_298K_au": "H",  # sic: the CSV header's spelling
    "GibbsFreeEnergy_298K_au": "G",
}
_TENSOR_COLUMNS = ("A_xx", "A_xy", "A_yy", "A_xz", "A_yz", "A_zz")
_STRIP_BRACKETS = str.maketrans("", "", "[]' ")
# Per-structure properties of QM9 that are not targets: (xx, xy, yy, xz, yz, zz) in bohr^3 in the
# quantum-chemistry program's standard orientation, NOT in the frame of the positions.
POLARIZABILITY_TENSOR = "polarizability_tensor"


def qm9pack_data_dir() -> Path:
    """The ``data`` folder of the installed ``qm9pack`` wheel (located without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise IrrepscopeError("QM9 data not found: install qm9pack (pip install qm9pack)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def default_cache_dir() -> Path:
    """``$IRREPSCOPE_CACHE`` if set, else ``~/.cache/irrepscope``."""
    env = os.environ.get("IRREPSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "irrepscope"


# Bytes hashed at each end of every source file: enough to tell two releases apart, cheap at every start.
FINGERPRINT_BYTES = 1 << 20


def _fingerprint(source_dir: Path) -> str:
    """What the cache was built from, by content (size and hashes of both ends of each file), not by path.

    Two installs of the same data (two clones, two virtual environments) share one cache;
    a different release or an edited file rebuilds it.
    """
    files = {}
    for name in (*SOURCE_FILES, POLARIZABILITY_FILE):
        path = source_dir / name
        if not path.is_file():
            raise IrrepscopeError(f"QM9 data file {path} is missing: install qm9pack (pip install qm9pack)")
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(0, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
        files[name] = [size, digest.hexdigest()]
    return json.dumps({"parser_version": PARSER_VERSION, "files": files}, sort_keys=True)


def load_qm9(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    source_dir: str | os.PathLike | None = None,
) -> Structures:
    """Load QM9 as :class:`~irrepscope.data.structures.Structures`, parsing the ``qm9pack`` CSVs only when no valid
    cache exists.

    ``cache_dir``: where ``qm9.npz`` lives (default: ``default_cache_dir()``).
    ``source_dir``: folder holding the four CSVs (default: the ``qm9pack`` wheel's data).
    Structures are sorted by their QM9 index. Per structure: the scalar ``PROPERTIES``, the
    charge multipoles, ``qm9_index``, ``smiles`` and ``polarizability_tensor``; per atom:
    ``mulliken`` (e). Bonds are perceived once and cached.
    """
    from irrepscope.data.multipoles import charge_multipoles  # it builds on the structures

    mols = _load_scalars(cache_dir, progress, source_dir)
    # Derived from the cached charges and coordinates on every load (well under a second).
    mols.properties.update(charge_multipoles(mols))
    return mols


def _load_scalars(
    cache_dir: str | os.PathLike | None, progress: bool, source_dir: str | os.PathLike | None
) -> Structures:
    source = Path(source_dir) if source_dir is not None else qm9pack_data_dir()
    fingerprint = _fingerprint(source)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / CACHE_NAME
    if cache_file.exists():
        try:
            mols = _read_cache(cache_file, fingerprint)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, IrrepscopeError) as err:
            warnings.warn(f"QM9 cache {cache_file} is unreadable ({err}); rebuilding it", stacklevel=2)
            mols = None
        if mols is not None:
            return mols
    mols = _parse_source(source, progress)
    try:
        _write_cache(cache_file, mols, fingerprint)
    except OSError as err:  # the data is fine; only the next start will be slower
        warnings.warn(f"cannot write the QM9 cache {cache_file} ({err}); set IRREPSCOPE_CACHE", stacklevel=2)
    return mols


def _read_cache(path: Path, fingerprint: str) -> Structures | None:
    """The cached molecules, or None when the cache was built from other sources or parser."""
    with np.load(path, allow_pickle=False) as f:
        if str(f["fingerprint"]) != fingerprint:
            return None
        smiles = f["smiles_blob"].tobytes().decode("utf-8").split("\n")
        mols = Structures(
            atomic_numbers=f["atomic_numbers"].astype(np.int64),
            positions=f["positions"],
            atom_ptr=f["atom_ptr"],
            properties={
                **{name: f[f"property_{name}"] for name in PROPERTIES},
                QM9_INDEX: f["qm9_index"],
                SMILES: np.array(smiles, dtype=object),
                POLARIZABILITY_TENSOR: f["polarizability_tensor"],
            },
            atom_properties={MULLIKEN: f["mulliken"]},
            bonds=f["bonds"].astype(np.int64),
            bond_ptr=f["bond_ptr"],
        )
    mols.validate()
    return mols


def _write_cache(path: Path, mols: Structures, fingerprint: str) -> None:
    # Narrow dtypes (Z < 256; QM9 molecules have <= 29 atoms) save ~50 MB; widened on load.
    arrays = {
        "fingerprint": np.array(fingerprint),
        "atomic_numbers": mols.atomic_numbers.astype(np.uint8),
        "positions": mols.positions,
        "atom_ptr": mols.atom_ptr,
        "bonds": mols.bonds.astype(np.uint8),
        "bond_ptr": mols.bond_ptr,
        "mulliken": mols.atom_properties[MULLIKEN],
        "qm9_index": mols.properties[QM9_INDEX],
        "smiles_blob": np.frombuffer("\n".join(mols.properties[SMILES]).encode("utf-8"), dtype=np.uint8),
        "polarizability_tensor": mols.properties[POLARIZABILITY_TENSOR],
        **{f"property_{name}": mols.properties[name] for name in PROPERTIES},
    }

    def write(f: IO[bytes]) -> None:
        np.savez(f, **arrays)

    atomic_write(path, write)


def _numbers(text: str, expected: int, what: str) -> np.ndarray:
    """Parse comma-separated floats (brackets already stripped), insisting on ``expected`` values."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns, rather than fails, on trailing garbage
        try:
            values = np.fromstring(text, dtype=np.float64, sep=",")
        except (ValueError, DeprecationWarning) as err:
            raise IrrepscopeError(f"QM9 CSV: cannot parse {what}: {err}") from None
    if len(values) != expected:
        raise IrrepscopeError(f"QM9 CSV: expected {expected} {what} values, found {len(values)}")
    return values


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise IrrepscopeError(f"QM9 CSV {path} is empty")
        return header, list(reader)


def _column(header: list[str], name: str, path: Path) -> int:
    try:
        return header.index(name)
    except ValueError:
        raise IrrepscopeError(f"QM9 CSV {path} has no column {name!r}") from None


def _parse_source(source: Path, progress: bool) -> Structures:
    """Parse the four CSVs into structures sorted by QM9 index, with bonds perceived."""
    paths = [source / name for name in SOURCE_FILES]
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="QM9: reading CSV", disable=not progress) as bar:
        raw = _read_csvs(paths, bar)
        bar.set_description("QM9: converting")
        mols = _to_molecules(raw, source)
        bar.set_description("QM9: perceiving bonds")
        mols.bonds, mols.bond_ptr = covalent_bonds_many(mols.atomic_numbers, mols.positions, mols.atom_ptr)
    mols.validate()
    return mols


_TEXT_COLUMNS = ("XYZ_file", "SMILES", "Elements", "XYZ_Ang", "Mulliken_pop")


def _read_csvs(paths: list[Path], bar: tqdm) -> dict[str, list]:
    """The raw fields of every row: text columns as strings, Index and N_atoms as ints, scalars as strings."""
    scalar_names = [*_SCALAR_COLUMNS, *_ENERGY_COLUMNS]
    raw: dict[str, list] = {c: [] for c in (*_TEXT_COLUMNS, "Index", "N_atoms", "scalars")}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(_lines_with_progress(f, bar))
            header = next(reader, None)
            if header is None:
                raise IrrepscopeError(f"QM9 CSV {path} is empty")
            text_cols = [(raw[c], _column(header, c, path)) for c in _TEXT_COLUMNS]
            index_col, n_col = _column(header, "Index", path), _column(header, "N_atoms", path)
            scalar_cols = [_column(header, c, path) for c in scalar_names]
            for row in reader:
                try:
                    n = int(row[n_col])
                    raw["Index"].append(int(row[index_col]))
                    raw["scalars"].append([row[c] for c in scalar_cols])
                    for values, c in text_cols:
                        values.append(row[c])
                except (IndexError, ValueError):
                    raise IrrepscopeError(f"QM9 CSV {path}: malformed row {reader.line_num}") from None
                # Cheap per-row check, so that a bad row cannot shift every later molecule's atoms.
                if (
                    raw["XYZ_Ang"][-1].count("[") - 1 != n
                    or raw["Elements"][-1].count(",") + 1 != n
                    or raw["Mulliken_pop"][-1].count(",") + 1 != n
                ):
                    raise IrrepscopeError(f"QM9 CSV {path}: row {reader.line_num} does not hold {n} atoms")
                raw["N_atoms"].append(n)
    return raw


def _to_molecules(raw: dict[str, list], source: Path) -> Structures:
    """Convert raw CSV fields to structures (sorted by QM9 index, bonds not yet perceived)."""
    m = len(raw["Index"])
    if m == 0:
        raise IrrepscopeError(f"QM9 CSVs in {source} hold no molecules")
    n_atoms = np.array(raw["N_atoms"], dtype=np.int64)
    atom_ptr = pointer(n_atoms)
    a = int(atom_ptr[-1])
    symbols = ",".join(raw["Elements"]).translate(_STRIP_BRACKETS).split(",")
    try:
        z = np.array([_SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64)
    except KeyError as err:
        raise IrrepscopeError(f"QM9 CSV: unexpected element {err.args[0]!r}") from None
    positions = _numbers(",".join(raw["XYZ_Ang"]).translate(_STRIP_BRACKETS), 3 * a, "coordinate").reshape(a, 3)
    charges = _numbers(",".join(raw["Mulliken_pop"]).translate(_STRIP_BRACKETS), a, "Mulliken charge")
    try:
        table = np.array(raw["scalars"], dtype=np.float64)
    except ValueError as err:
        raise IrrepscopeError(f"QM9 CSV: non-numeric property value ({err})") from None

    properties = {prop: table[:, k] * factor for k, (prop, factor) in enumerate(_SCALAR_COLUMNS.values())}
    mol_of_atom = np.repeat(np.arange(m), n_atoms)
    for k, quantity in enumerate(_ENERGY_COLUMNS.values(), start=len(_SCALAR_COLUMNS)):
        ref = np.zeros(max(_SYMBOL_TO_Z.values()) + 1)
        for zz, e in ATOM_REF_HARTREE[quantity].items():
            ref[zz] = e
        atoms_sum = np.bincount(mol_of_atom, weights=ref[z], minlength=m)
        properties[f"{quantity}_atomization"] = (table[:, k] - atoms_sum) * HARTREE_TO_EV
        if quantity == "U0":
            properties["U0"] = table[:, k] * HARTREE_TO_EV

    index = np.array(raw["Index"], dtype=np.int64)
    if len(np.unique(index)) != m:
        raise IrrepscopeError("QM9 CSV: duplicate molecule Index values")
    mols = Structures(
        atomic_numbers=z,
        positions=positions,
        atom_ptr=atom_ptr,
        properties={
            **{name: properties[name] for name in PROPERTIES},
            QM9_INDEX: index,
            SMILES: np.array(raw["SMILES"], dtype=object),
            POLARIZABILITY_TENSOR: _polarizability_tensors(source / POLARIZABILITY_FILE, raw["XYZ_file"]),
        },
        atom_properties={MULLIKEN: charges},
    )
    order = np.argsort(index, kind="stable")
    return mols.subset(order) if np.any(order != np.arange(m)) else mols


def _lines_with_progress(f: IO[str], bar: tqdm) -> Iterable[str]:
    """The lines of ``f``, advancing ``bar`` by their length (bytes, for ASCII files)."""
    for line in f:
        bar.update(len(line))
        yield line


def _polarizability_tensors(path: Path, names: list[str]) -> np.ndarray:
    """The six tensor components for each molecule file name in ``names``, matched by name."""
    header, rows = _read_rows(path)
    cols = [_column(header, c, path) for c in _TENSOR_COLUMNS]
    key = _column(header, "XYZ_file", path)
    try:
        by_name = {row[key]: [float(row[c]) for c in cols] for row in rows}
        return np.array([by_name[name] for name in names], dtype=np.float64)
    except KeyError as err:
        raise IrrepscopeError(f"{path} has no polarizability tensor for {err.args[0]}") from None
    except (IndexError, ValueError):
        raise IrrepscopeError(f"{path}: malformed row") from None
