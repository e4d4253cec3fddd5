"""Molecular complexity for colouring the latent maps: RDKit's normalised spatial score (nSPS).

nSPS (Krzyzanowski et al. 2023) sums, over heavy atoms, hybridisation x stereo x
non-aromatic-ring x (heavy neighbours)^2 terms and divides by the number of heavy atoms.
We also report each term averaged over heavy atoms. Molecules are parsed from the QM9
SMILES with sanitisation (bond orders, aromaticity and hybridisation need it); a
molecule RDKit cannot parse or sanitise gets NaN everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

COMPONENTS = ("nsps", "hybridisation", "stereo", "ring", "neighbours")
_TERMS = {"hybridisation": "hyb_score", "stereo": "stereo_score", "ring": "ring_score", "neighbours": "bond_score"}


def spatial_score(smiles: str) -> dict[str, float]:
    """nSPS and its mean per-heavy-atom terms for one SMILES (NaN where RDKit fails or there is no SMILES)."""
    nan = {k: float("nan") for k in COMPONENTS}
    if not smiles:  # molecules read from geometry files carry no SMILES; RDKit is then not needed
        return nan
    from rdkit import Chem, RDLogger
    from rdkit.Chem.SpacialScore import _SpacialScore

    RDLogger.DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromSmiles(smiles, sanitize=True)
        if mol is None:
            return nan
        sps = _SpacialScore(mol, normalize=True)
    except Exception:  # RDKit raises assorted errors on odd inputs; the colour is then missing, not fatal
        return nan
    out = {"nsps": float(sps.score)}
    for name, attr in _TERMS.items():
        values = list(getattr(sps, attr).values())  # one entry per heavy atom (implicit H)
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


def spatial_scores(smiles: Sequence[str], progress: Iterable | None = None) -> dict[str, np.ndarray]:
    """Arrays ``[M]`` of every component of :data:`COMPONENTS` for a list of SMILES."""
    rows = [spatial_score(s) for s in (progress if progress is not None else smiles)]
    return {k: np.array([r[k] for r in rows], dtype=float) for k in COMPONENTS}
