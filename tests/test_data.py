"""The data layer on the real QM9 files: parsing, cache, bonds, splits, batching, structure files."""

import csv
import os
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from rdkit import Chem, RDLogger

from irrepscope.data import (
    PROPERTIES,
    check_elements,
    collate,
    covalent_bonds,
    default_cache_dir,
    iterate_batches,
    load_qm9,
    load_split,
    load_split_meta,
    radius_edges,
    random_split,
    read_structures,
    save_split,
)
from irrepscope.data import qm9 as qm9_module
from irrepscope.data.structures import Structures
from irrepscope.errors import IrrepscopeError


def by_qm9_index(mols, index):
    return int(np.searchsorted(mols.properties["qm9_index"], index))


def find_smiles(mols, smiles):
    """The dataset index of the molecule whose SMILES is ``smiles`` up to RDKit canonicalisation."""
    canonical = Chem.CanonSmiles(smiles)
    n = Chem.AddHs(Chem.MolFromSmiles(smiles)).GetNumAtoms()
    for i in np.flatnonzero(np.diff(mols.atom_ptr) == n):
        if Chem.CanonSmiles(mols.properties["smiles"][i]) == canonical:
            return int(i)
    raise AssertionError(f"{smiles} not in QM9")


# --- the dataset ---------------------------------------------------------------------


def test_size_order_and_properties(qm9):
    assert len(qm9) == 130_831
    assert qm9.properties["qm9_index"][0] == 1 and qm9.properties["qm9_index"][-1] == 133_885
    assert np.all(np.diff(qm9.properties["qm9_index"]) > 0)
    assert set(np.unique(qm9.atomic_numbers)) == {1, 6, 7, 8, 9}
    assert set(qm9.properties) == set(PROPERTIES) | {"charge_dipole", "charge_quadrupole", "qm9_index", "smiles", "polarizability_tensor"}
    assert set(qm9.atom_properties) == {"mulliken"} and qm9.cell is None and not qm9.periodic.any()
    assert all(qm9.properties[k].dtype == np.float64 and qm9.properties[k].shape == (len(qm9),) for k in PROPERTIES)
    assert qm9.properties["charge_dipole"].shape == (len(qm9), 3) and qm9.properties["charge_quadrupole"].shape == (len(qm9), 5)
    assert qm9.bond_graph()[0].dtype == np.int64 and np.all(qm9.bond_graph()[0][:, 0] < qm9.bond_graph()[0][:, 1])
    # The brief's standardisation constants for the U0 atomization energy.
    assert qm9.properties["U0_atomization"].mean() == pytest.approx(-76.12, abs=0.01)
    assert qm9.properties["U0_atomization"].std() == pytest.approx(10.32, abs=0.01)


def test_methane(qm9):
    i = by_qm9_index(qm9, 1)
    z, pos = qm9.structure(i)
    assert list(z) == [6, 1, 1, 1, 1] and pos.shape == (5, 3)
    assert qm9.properties["U0_atomization"][i] == pytest.approx(-17.17, abs=0.01)
    assert qm9.properties["U0"][i] == pytest.approx(-40.47893 * 27.211386, abs=1e-6)
    assert qm9.properties["smiles"][i] == "C"
    assert len(qm9.structure_bonds(i)) == 4


@pytest.mark.parametrize(("smiles", "bonds"), [("O", 2), ("N", 3), ("OCC", 8), ("c1ccccc1", 12), ("CC(C)=O", 9)])
def test_known_bond_counts(qm9, smiles, bonds):
    i = find_smiles(qm9, smiles)
    assert len(qm9.structure_bonds(i)) == bonds
    z, pos = qm9.structure(i)
    np.testing.assert_array_equal(covalent_bonds(z, pos), qm9.structure_bonds(i))


def test_bond_counts_agree_with_rdkit(qm9):
    RDLogger.DisableLog("rdApp.*")
    sample = np.random.default_rng(1).choice(len(qm9), 2000, replace=False)
    agree = 0
    for i in sample:
        mol = Chem.AddHs(Chem.MolFromSmiles(qm9.properties["smiles"][i]))
        agree += mol.GetNumBonds() == len(qm9.structure_bonds(i))
    assert agree / len(sample) >= 0.99


def test_subset_and_charge_dipole(qm9):
    idx = [5, 0, 100]
    sub = qm9.subset(idx)
    assert len(sub) == 3 and list(sub.properties["qm9_index"]) == list(qm9.properties["qm9_index"][idx])
    for k, i in enumerate(idx):
        np.testing.assert_array_equal(sub.structure(k)[1], qm9.structure(i)[1])
        np.testing.assert_array_equal(sub.structure_bonds(k), qm9.structure_bonds(i))
        assert sub.properties["gap"][k] == qm9.properties["gap"][i]
    water = by_qm9_index(qm9, 3)
    z, pos = qm9.structure(water)
    q = qm9.atom_properties["mulliken"][qm9.atom_ptr[water] : qm9.atom_ptr[water + 1]]
    np.testing.assert_array_equal(qm9.atom_property("mulliken", water), q)
    assert len(q) == len(z) == 3 and sub.atom_property("mulliken", 0).shape == (qm9.num_atoms(5),)
    with pytest.raises(IrrepscopeError):
        qm9.subset([len(qm9)])


# --- cache ---------------------------------------------------------------------------


def test_cache_is_reused(qm9, monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(qm9_module, "_parse_source", no_parse)
    again = load_qm9()  # how much faster than parsing: benchmarks/data.py
    assert len(again) == len(qm9)
    np.testing.assert_array_equal(again.positions, qm9.positions)
    assert list(again.properties["smiles"]) == list(qm9.properties["smiles"])


@pytest.fixture
def small_source(tmp_path):
    """The first 200 molecules of each QM9 CSV (and their polarizability rows), in tmp_path/src."""
    source, out = qm9_module.qm9pack_data_dir(), tmp_path / "src"
    out.mkdir()
    names = set()
    for name in qm9_module.SOURCE_FILES:
        with open(source / name, newline="") as f:
            lines = [next(f) for _ in range(201)]
        (out / name).write_text("".join(lines))
        names.update(row[0] for row in csv.reader(lines[1:]))
    with open(source / qm9_module.POLARIZABILITY_FILE, newline="") as f:
        header, *rows = list(csv.reader(f))
    with open(out / qm9_module.POLARIZABILITY_FILE, "w", newline="") as f:
        csv.writer(f).writerows([header, *(r for r in rows if r[0] in names)])
    return out


def test_small_source_parses_like_the_full_set(qm9, small_source, tmp_path):
    small = load_qm9(tmp_path / "cache", progress=False, source_dir=small_source)
    assert len(small) == 600
    idx = np.searchsorted(qm9.properties["qm9_index"], small.properties["qm9_index"])
    full = qm9.subset(idx)
    np.testing.assert_array_equal(small.positions, full.positions)
    np.testing.assert_array_equal(small.bond_graph()[0], full.bond_graph()[0])
    np.testing.assert_array_equal(small.properties["polarizability_tensor"], full.properties["polarizability_tensor"])
    assert small.properties["U0_atomization"] == pytest.approx(full.properties["U0_atomization"])


def test_corrupt_or_stale_cache_is_rebuilt(small_source, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_qm9(cache, progress=False, source_dir=small_source)
    cache_file = cache / qm9_module.CACHE_NAME
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_qm9(cache, progress=False, source_dir=small_source)
    np.testing.assert_array_equal(again.positions, first.positions)

    cache_file.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="rebuilding"):
        load_qm9(cache, progress=False, source_dir=small_source)

    parses = []
    real_parse = qm9_module._parse_source
    monkeypatch.setattr(qm9_module, "_parse_source", lambda *a: parses.append(1) or real_parse(*a))
    load_qm9(cache, progress=False, source_dir=small_source)
    assert parses == []  # the rebuilt cache is valid
    monkeypatch.setattr(qm9_module, "PARSER_VERSION", qm9_module.PARSER_VERSION + 1)
    load_qm9(cache, progress=False, source_dir=small_source)
    assert parses == [1]  # a new parser version invalidates the cache
    part = small_source / "qm9_part3.csv"
    os.utime(part, ns=(1, 1))  # the cache is keyed by content, not by mtime: a touched file keeps it
    load_qm9(cache, progress=False, source_dir=small_source)
    assert parses == [1]
    text = part.read_bytes()
    last = max(text.rfind(bytes([d])) for d in b"0123456789")
    part.write_bytes(text[:last] + (b"1" if text[last:last + 1] != b"1" else b"2") + text[last + 1:])
    load_qm9(cache, progress=False, source_dir=small_source)
    assert parses == [1, 1]  # same size, one digit changed: rebuilt


def test_missing_source_is_a_clear_error(small_source, tmp_path):
    (small_source / "qm9_part2.csv").unlink()
    with pytest.raises(IrrepscopeError, match="install qm9pack"):
        load_qm9(tmp_path / "cache", progress=False, source_dir=small_source)


def test_malformed_source_is_a_clear_error(small_source, tmp_path):
    text = (small_source / "qm9_part1.csv").read_text().replace("'C'", "'Q'", 1)
    (small_source / "qm9_part1.csv").write_text(text)
    with pytest.raises(IrrepscopeError, match="unexpected element 'Q'"):
        load_qm9(tmp_path / "cache", progress=False, source_dir=small_source)


# --- splits --------------------------------------------------------------------------


def test_split_determinism_and_coverage():
    a, b = random_split(1000, seed=3), random_split(1000, seed=3)
    c = random_split(1000, seed=4)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["test"], c["test"])
    assert [len(a[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(1000))

    limited = random_split(130_831, (0.8, 0.1, 0.1), seed=0, limit=500)
    joined = np.concatenate(list(limited.values()))
    assert len(joined) == len(np.unique(joined)) == 500 and joined.max() < 130_831
    assert [len(limited[k]) for k in ("train", "val", "test")] == [400, 50, 50]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fractions": (0.8, 0.1, 0.2)}, "sum"),
        ({"fractions": (1.1, -0.1, 0.0)}, "non-negative"),
        ({"fractions": (0.9, 0.1, 0.0)}, "test empty"),
        ({"limit": 0}, "limit"),
        ({"limit": 11}, "limit"),
    ],
)
def test_bad_split_arguments(kwargs, message):
    with pytest.raises(IrrepscopeError, match=message):
        random_split(10, **kwargs)


def test_split_file_roundtrip_and_errors(tmp_path):
    split = random_split(100, seed=7, limit=50)
    meta = {"seed": 7, "fractions": [0.8, 0.1, 0.1], "limit": 50, "n": 100}
    path = save_split(tmp_path / "split.json", split, meta)
    loaded = load_split(path, n=100)
    for name in split:
        np.testing.assert_array_equal(loaded[name], split[name])
    assert load_split_meta(path) == meta
    with pytest.raises(IrrepscopeError, match="outside"):
        load_split(path, n=10)
    with pytest.raises(IrrepscopeError, match="not found"):
        load_split(tmp_path / "missing.json")
    path.write_text(path.read_text()[:50])
    with pytest.raises(IrrepscopeError, match="corrupt"):
        load_split(path)
    overlapping = {"train": np.array([0, 1]), "val": np.array([1]), "test": np.array([2])}
    with pytest.raises(IrrepscopeError, match="overlap"):
        save_split(tmp_path / "bad.json", overlapping, meta)


# --- batching ------------------------------------------------------------------------


def check_edges(batch):
    src, dst = batch.edge_src, batch.edge_dst
    assert src.dtype == dst.dtype == torch.long
    assert torch.all(src != dst)
    assert torch.all(batch.batch[src] == batch.batch[dst])  # within molecules
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert len(pairs) == len(src) and pairs == {(d, s) for s, d in pairs}  # symmetric, no duplicates


def test_collate_bond_graph(qm9):
    idx = np.array([0, 2, 13, 208, 5000, 130_000])
    batch = collate(qm9, idx, "U0_atomization")
    n = sum(qm9.num_atoms(i) for i in idx)
    assert batch.z.shape == (n,) and batch.pos.shape == (n, 3) and batch.batch.shape == (n,)
    assert batch.pos.dtype == torch.float32 and batch.z.dtype == torch.long
    assert batch.num_graphs == 6 and batch.mol_index.tolist() == idx.tolist()
    assert len(batch.edge_src) == 2 * sum(len(qm9.structure_bonds(i)) for i in idx)
    np.testing.assert_allclose(batch.y.numpy(), qm9.properties["U0_atomization"][idx], rtol=1e-6)
    check_edges(batch)
    start = 0
    for k, i in enumerate(idx):
        z, pos = qm9.structure(i)
        assert batch.z[start : start + len(z)].tolist() == z.tolist()
        assert torch.all(batch.batch[start : start + len(z)] == k)
        start += len(z)
    double = collate(qm9, idx, None, dtype=torch.float64)
    assert double.y is None and double.pos.dtype == torch.float64
    assert torch.equal(double.edge_src, batch.edge_src)
    moved = batch.to("cpu")
    assert torch.equal(moved.pos, batch.pos)


def test_collate_errors(qm9):
    with pytest.raises(IrrepscopeError, match="unknown graph"):
        collate(qm9, [0], None, graph="knn")
    with pytest.raises(IrrepscopeError, match="unknown target"):
        collate(qm9, [0], "energy")
    with pytest.raises(IrrepscopeError, match="out of range"):
        collate(qm9, [len(qm9)], None)


@pytest.mark.parametrize("cutoff", [2.0, 6.0])
def test_radius_graph_matches_brute_force(qm9, cutoff):
    idx = np.random.default_rng(0).choice(len(qm9), 32, replace=False)
    batch = collate(qm9, idx, None, graph="radius", cutoff=cutoff)
    check_edges(batch)
    expected = 0
    for i in idx:
        _, pos = qm9.structure(i)
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        expected += int(((d < cutoff) & ~np.eye(len(pos), dtype=bool)).sum())
    assert len(batch.edge_src) == expected
    # Atoms in any order: the same edge set, up to the permutation.
    pos, mol = batch.pos.double(), batch.batch
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))
    src, dst = radius_edges(pos[perm], mol[perm], cutoff)
    permuted = set(zip(perm[src].tolist(), perm[dst].tolist()))
    assert permuted == set(zip(batch.edge_src.tolist(), batch.edge_dst.tolist()))


def test_iterate_batches(qm9):
    indices = np.arange(1000, 1100)
    batches = list(iterate_batches(qm9, indices, 32, shuffle=True, seed=5, target="gap"))
    assert [b.num_graphs for b in batches] == [32, 32, 32, 4]
    seen = torch.cat([b.mol_index for b in batches]).numpy()
    assert sorted(seen) == list(indices) and not np.array_equal(seen, indices)
    again = torch.cat([b.mol_index for b in iterate_batches(qm9, indices, 32, shuffle=True, seed=5, target="gap")])
    assert np.array_equal(again.numpy(), seen)
    in_order = torch.cat([b.mol_index for b in iterate_batches(qm9, indices, 32, shuffle=False, target=None)])
    assert np.array_equal(in_order.numpy(), indices)
    rng = np.random.default_rng(0)
    epoch1 = [b.mol_index for b in iterate_batches(qm9, indices, 50, shuffle=True, seed=rng, target=None)]
    epoch2 = [b.mol_index for b in iterate_batches(qm9, indices, 50, shuffle=True, seed=rng, target=None)]
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))


def test_batching_covers_a_large_shuffled_range(qm9):
    """20,000 molecules in shuffled batches of 32: each exactly once (the speed: benchmarks/data.py)."""
    indices = np.arange(20_000)
    batches = list(iterate_batches(qm9, indices, 32, shuffle=True, seed=0, target="U0_atomization"))
    assert sum(b.num_graphs for b in batches) == 20_000 and len(batches) == 625
    seen = torch.cat([b.mol_index for b in batches]).numpy()
    assert np.array_equal(np.sort(seen), indices)


def test_structures_from_arrays_match_qm9(qm9):
    """Structures built from bare (z, pos) pairs perceive the same bonds and batch like QM9's own."""
    idx = [0, 13, 208]
    structures = Structures.from_arrays([tuple(np.array(a) for a in qm9.structure(i)) for i in idx])
    from_arrays = collate(structures, np.arange(3), None)
    from_dataset = collate(qm9, idx, None)
    assert from_arrays.y is None and from_arrays.mol_index.tolist() == [0, 1, 2]
    for name in ("z", "pos", "batch", "edge_src", "edge_dst"):
        assert torch.equal(getattr(from_arrays, name), getattr(from_dataset, name))
    with pytest.raises(IrrepscopeError):
        Structures.from_arrays([])


# --- structure files -----------------------------------------------------------------


def test_read_structures(qm9, tmp_path):
    frames = [ase.Atoms(numbers=z, positions=pos) for z, pos in (qm9.structure(0), qm9.structure(2))]
    path = tmp_path / "mols.xyz"
    ase.io.write(path, frames)
    structures = read_structures(path)
    assert len(structures) == 2
    for (z, pos), atoms in zip((structures.structure(i) for i in range(len(structures))), frames):
        assert z.dtype == np.int64 and z.tolist() == atoms.numbers.tolist()
        np.testing.assert_allclose(pos, atoms.positions, atol=1e-7)
    ext = tmp_path / "mols.extxyz"
    ase.io.write(ext, frames, format="extxyz")
    assert len(read_structures(ext)) == 2


def test_read_structures_errors(tmp_path):
    with pytest.raises(IrrepscopeError, match="not found"):
        read_structures(tmp_path / "missing.xyz")
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\n\nXx 0 0 0\nH 0 0 1\n")
    with pytest.raises(IrrepscopeError, match="unknown element symbol 'Xx'"):
        read_structures(bad)
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(IrrepscopeError, match="empty.xyz"):
        read_structures(empty)
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("three\nno header\n")
    with pytest.raises(IrrepscopeError, match="cannot read structure file .*garbage.xyz"):
        read_structures(garbage)


def test_check_elements():
    check_elements(np.array([1, 6, 8]), {1, 6, 7, 8, 9})
    with pytest.raises(IrrepscopeError, match=r"element Cl \(Z=17\) is not supported; allowed: H, C, N, O, F"):
        check_elements(np.array([6, 17]), {1, 6, 7, 8, 9})


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IRREPSCOPE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IRREPSCOPE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "irrepscope"
