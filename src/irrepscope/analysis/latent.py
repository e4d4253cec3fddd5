"""2-D maps of the rotation-invariant graph embedding, one per order and one joint, with structure scores.

Inputs (never raw l > 0 components, which rotate with the molecule): the l = 0 block of
the sum-pooled last-block features as it is, and for l > 0 the norm of each of the H
copies. Every column is standardised before mapping, so that the joint map weighs the
orders' channels equally rather than by their scale.

Scores per map:

* ``knn_r2``: R^2 of 10-nearest-neighbour regression of the target inside the 2-D map
  (5-fold cross-validated predictions): how well the map's neighbourhoods organise the target.
* ``trustworthiness``: sklearn's trustworthiness (10 neighbours) of the 2-D map with
  respect to the standardised input, on at most ``TRUST_SAMPLE`` points (it is O(n^2)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from irrepscope.errors import IrrepscopeError

EMBEDDINGS = ("phate", "umap", "pca")
KNN = 10
TRUST_SAMPLE = 2000
# PHATE diffuses between this many landmarks (its own approximation for large inputs: spectral clusters of the
# kNN graph) and places every point from them: six 2,000-molecule maps in 15.5 s instead of 52.2 s on 2 cores,
# their kNN R^2 within 0.05 of the exact maps' (benchmarks/analysis.py); inputs this small are mapped exactly.
LANDMARKS = 300


def map_inputs(invariants: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-order inputs ``l=<l>`` and the ``joint`` concatenation, from order -> [M, H] invariants."""
    out = {f"l={l}": np.asarray(v, dtype=float) for l, v in invariants.items()}
    out["joint"] = np.concatenate([out[f"l={l}"] for l in invariants], axis=1)
    return out


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column; constant columns become 0."""
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def embed_2d(x: np.ndarray, method: str = "phate", seed: int = 0, n_jobs: int = 2) -> np.ndarray:
    """2-D coordinates of the rows of ``x`` (standardised first); a featureless input gives zeros."""
    if method not in EMBEDDINGS:
        raise IrrepscopeError(f"unknown embedding {method!r}; choose one of {EMBEDDINGS}")
    z = standardise(np.asarray(x, dtype=float))
    n = len(z)
    if n < 3 or not np.any(z):
        return np.zeros((n, 2))
    if method == "pca" or n <= KNN + 2:
        from sklearn.decomposition import PCA

        y = PCA(n_components=min(2, z.shape[1]), random_state=seed).fit_transform(z)
        return np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
    if method == "umap":
        import umap

        return umap.UMAP(n_neighbors=KNN, n_components=2, random_state=seed, n_jobs=1).fit_transform(z)
    import phate

    op = phate.PHATE(knn=KNN, n_components=2, random_state=seed, n_jobs=n_jobs, verbose=0, n_landmark=LANDMARKS).fit(z)
    # PHATE's t="auto", with the singular values alone: its own code takes a full SVD (U and V too), 40 % of a map's time.
    op.set_params(t=optimal_t(op.diff_op))
    return np.asarray(op.transform())


def optimal_t(diff_op: Any, t_max: int = 100) -> int:
    """PHATE's automatic diffusion time: the knee of the von Neumann entropy of ``diff_op``'s powers (as
    ``phate.vne.compute_von_neumann_entropy``, from the singular values only)."""
    import scipy.linalg
    import scipy.sparse
    from phate import vne

    dense = diff_op.toarray() if scipy.sparse.issparse(diff_op) else np.asarray(diff_op)
    eigenvalues = scipy.linalg.svdvals(dense)
    entropy, powers = [], eigenvalues.copy()
    for _ in range(t_max):
        prob = powers / np.sum(powers) + np.finfo(float).eps
        entropy.append(-np.sum(prob * np.log(prob)))
        powers = powers * eigenvalues
    return int(vne.find_knee_point(y=np.array(entropy), x=np.arange(t_max)))


def structure_scores(x: np.ndarray, y2: np.ndarray, target: np.ndarray, seed: int = 0) -> dict[str, float]:
    """``knn_r2`` and ``trustworthiness`` of a 2-D map ``y2`` of input ``x`` (see the module doc)."""
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor

    n = len(y2)
    if n <= 2 * KNN or not np.any(y2):
        return {"knn_r2": float("nan"), "trustworthiness": float("nan")}
    cv = KFold(5, shuffle=True, random_state=seed)
    pred = cross_val_predict(KNeighborsRegressor(n_neighbors=KNN), y2, target, cv=cv)
    rng = np.random.default_rng(seed)
    sub = rng.choice(n, size=min(n, TRUST_SAMPLE), replace=False)
    trust = trustworthiness(standardise(x)[sub], y2[sub], n_neighbors=KNN)
    return {"knn_r2": float(r2_score(target, pred)), "trustworthiness": float(trust)}


def latent_maps(
    invariants: dict[int, np.ndarray], target: np.ndarray, method: str, seed: int = 0, progress=None
) -> dict[str, dict[str, Any]]:
    """For every map input: its 2-D ``coords`` and ``scores``."""
    inputs = map_inputs(invariants)
    items = list(inputs.items())
    out = {}
    for name, x in progress(items, len(items), f"maps ({method})") if progress else items:
        coords = embed_2d(x, method, seed)
        out[name] = {"coords": coords, "scores": structure_scores(x, coords, target, seed)}
    return out
