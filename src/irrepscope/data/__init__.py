"""Structures (one type for every source), QM9, structure files, graphs, splits, batching."""

from irrepscope.data.batching import Batch, collate, iterate_batches
from irrepscope.data.graphs import BOND_SCALE, COVALENT_RADII, bonds_to_directed, covalent_bonds, radius_edges
from irrepscope.data.qm9 import (
    ATOM_REF_HARTREE,
    ATOM_REF_U0_HARTREE,
    HARTREE_TO_EV,
    PROPERTIES,
    default_cache_dir,
    load_qm9,
)
from irrepscope.data.sources import load_structures
from irrepscope.data.structures import ENERGY, FORCES, Structures
from irrepscope.data.split import load_split, load_split_meta, random_split, save_split
from irrepscope.data.xyz import check_elements, read_extxyz, read_structures

__all__ = [
    "ATOM_REF_HARTREE",
    "ATOM_REF_U0_HARTREE",
    "BOND_SCALE",
    "COVALENT_RADII",
    "HARTREE_TO_EV",
    "PROPERTIES",
    "ENERGY",
    "FORCES",
    "Batch",
    "Structures",
    "bonds_to_directed",
    "check_elements",
    "collate",
    "covalent_bonds",
    "default_cache_dir",
    "iterate_batches",
    "load_qm9",
    "load_structures",
    "load_split",
    "load_split_meta",
    "radius_edges",
    "random_split",
    "read_extxyz",
    "read_structures",
    "save_split",
]
