"""The order-usage analysis: checks whose answers are known by construction, invariance, bad input, end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3

from helpers import run_cli, scale_order_paths
from irrepscope.analysis import complexity, latent, usage
from irrepscope.analysis.features import collect
from irrepscope.analysis.interface import AnalysedModel
from irrepscope.analysis.own_model import OwnModel
from irrepscope.analysis.runner import _subset, analyze_model, check_orders
from irrepscope.config import ModelConfig
from irrepscope.data import collate
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import build_model

ROOT = Path(__file__).resolve().parents[1]
EVAL = np.arange(100, 122)
TRAIN = np.arange(1000, 1040)
COMMON = dict(target="U0_atomization", batch_size=16)


def rerun_ablation(model, batch, block, l):
    """Predictions with order ``l`` zeroed after ``block`` (None: every block), re-running the model (the definition)."""
    own = OwnModel(model)
    return own.ablation(own.wrap(batch), block, l)


def tiny(orders=(0, 1, 2), mul=3, blocks=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(orders=list(orders), hidden_mul=mul, num_blocks=blocks))
    model.set_target_stats(-70.0, 10.0)
    return model.to(dtype).eval()


def zero_order_paths(model, l: int) -> None:
    """Zero the radial MLP's output columns of every path that reads or writes order ``l``, in every block."""
    scale_order_paths(model, l, 0.0)


def rows_of(model, mols, orders=None):
    ev = collect(OwnModel(model), mols, EVAL, gradients=True, orders=orders, **COMMON)
    probe = collect(OwnModel(model), mols, TRAIN, gradients=False, orders=orders, **COMMON)
    batch = collate(mols, EVAL, None, dtype=torch.float64)
    all_blocks = {l: rerun_ablation(model, batch, None, l).numpy() for l in ev.orders}
    return ev, usage.usage_rows(ev, all_blocks, probe)


def test_order_split_matches_e3nn_slices(qm9):
    model = tiny(orders=(0, 1, 3), mul=2)
    ev = collect(OwnModel(model), qm9, EVAL, gradients=False, **COMMON)
    batch = collate(qm9, EVAL, None, dtype=torch.float64)
    with torch.no_grad():
        graph = model(batch, return_features=True).graph_features
    for (mul, ir), sl in zip(model.irreps_hidden, model.irreps_hidden.slices()):
        block = graph[:, sl].reshape(len(EVAL), mul, ir.dim)
        expect = block[..., 0] if ir.l == 0 else block.norm(dim=-1)
        np.testing.assert_allclose(ev.graph_invariants[-1][ir.l], expect.numpy(), rtol=1e-10, atol=1e-12)


def test_gradients_on_a_subset_give_the_same_numbers(qm9):
    """The gradient pass on the ablation subset alone (the rest forward only): every molecule's numbers, in the
    order of the indices, equal those of the pass with gradients on all of them."""
    model = tiny(blocks=3)
    full = collect(OwnModel(model), qm9, EVAL, gradients=True, **COMMON)
    pos = np.array([1, 4, 5, 11, 20])  # batches of 16: the subset and the rest batch differently
    part = collect(OwnModel(model), qm9, EVAL, gradients=True, gradient_positions=pos, **COMMON)
    np.testing.assert_array_equal(part.indices, full.indices)
    np.testing.assert_array_equal(part.gradient_positions, pos)
    for name in ("prediction", "target", "heavy_atoms", "atoms", "node_sq", "graph_sq", "node_sq_total", "graph_sq_total"):
        np.testing.assert_allclose(getattr(part, name), getattr(full, name), rtol=1e-12, atol=1e-12, err_msg=name)
    for b in range(3):
        for l in model.orders:
            np.testing.assert_allclose(part.graph_invariants[b][l], full.graph_invariants[b][l], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(part.ablation_prediction, full.ablation_prediction[:, :, pos], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(part.grad_x_input, full.grad_x_input[:, :, pos], rtol=1e-12, atol=1e-12)
    assert part.num_edges == full.num_edges  # the path moments still cover every molecule's edges
    for a, b in zip(part.path_moment, full.path_moment, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # usage_rows on it: per-block ablations over the subset equal the full pass's restricted to it by hand
    batch = collate(qm9, EVAL[pos], None, dtype=torch.float64)
    all_blocks = {l: rerun_ablation(model, batch, None, l).numpy() for l in model.orders}
    rows = usage.usage_rows(part, all_blocks, None, resamples=50)
    err = np.abs(full.prediction - full.target)[pos]
    for row in rows:
        if row["block"] != "all" and row["verdict"] != "absent":
            j = model.orders.index(row["order"])
            ablated = np.abs(full.ablation_prediction[row["block"] - 1, j, pos] - full.target[pos])
            assert row["ablation_delta_mae_ev"] == pytest.approx(float(np.mean(ablated - err)), rel=1e-10, abs=1e-12)
    with pytest.raises(IrrepscopeError, match="ablation subset"):
        usage.usage_rows(part, {l: np.zeros(3) for l in model.orders}, None, resamples=10)


def test_gradient_ablation_equals_rerun(qm9):
    """The linear-model shortcut gives the same ablated predictions as re-running the later blocks."""
    model = tiny(blocks=3)
    ev = collect(OwnModel(model), qm9, EVAL, gradients=True, **COMMON)
    batch = collate(qm9, EVAL, None, dtype=torch.float64)
    for b in range(3):
        for j, l in enumerate(model.orders):
            np.testing.assert_allclose(ev.ablation_prediction[b, j], rerun_ablation(model, batch, b, l).numpy(), rtol=1e-9, atol=1e-9)
    # The readout reads only 0e: zeroing l > 0 at the last block changes nothing.
    np.testing.assert_allclose(ev.ablation_prediction[-1, 1:], np.broadcast_to(ev.prediction, ev.ablation_prediction[-1, 1:].shape), atol=1e-10)


@pytest.mark.parametrize("backend", ["e3nn", "fast"])
def test_all_blocks_ablation_leaves_the_order_out_exactly(qm9, backend):
    """Leaving an order out of every block gives the predictions of zeroing it after every block."""
    model = tiny(orders=(0, 2, 3), blocks=3)
    model.set_backend(backend)
    batch = collate(qm9, EVAL, None, dtype=torch.float64)
    own = OwnModel(model)
    got = own.all_blocks_ablation(own.wrap(batch), model.orders)
    generic = AnalysedModel.all_blocks_ablation(own, own.wrap(batch), model.orders)  # the interface's re-run
    with torch.no_grad():
        base = model(batch).prediction
    for l in model.orders:
        want = rerun_ablation(model, batch, None, l)
        torch.testing.assert_close(got[l], want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(generic[l], want, rtol=1e-12, atol=1e-12)
        assert (want - base).abs().max() > 1e-6  # the ablation does something: the check is not vacuous


def test_zeroed_order_has_no_effect_and_no_gradient(qm9):
    model = tiny(blocks=3)
    zero_order_paths(model, 2)
    ev, rows = rows_of(model, qm9)
    for r in rows:
        if r["order"] == 2:
            assert abs(r["ablation_delta_mae_ev"]) < 1e-9, r
            assert r["verdict"] == "unused"
            if r["block"] != "all":
                assert r["grad_x_input"] < 1e-12 and r["norm_share_node"] < 1e-20
    # ...but the other orders still do something, so the check is not vacuous
    assert any(r["order"] == 1 and r["block"] == 1 and r["ablation_delta_mae_ev"] != 0 for r in rows)
    unused, suggested = usage.decide_orders(model.orders, rows)
    assert 2 in unused and suggested[0] == 0 and 2 not in suggested
    # the path-weight RMS of those paths is zero too
    paths = OwnModel(model).path_weight_rms(ev.path_moment, ev.num_edges)
    assert all(p["rms"] == 0 for p in paths if p["l_in"] == 2 or p["l_out"] == 2)
    assert any(p["rms"] > 0 for p in paths)


def test_zeroing_order_zero_changes_predictions(qm9):
    model = tiny()
    batch = collate(qm9, EVAL, None, dtype=torch.float64)
    with torch.no_grad():
        base = model(batch).prediction
    assert (rerun_ablation(model, batch, None, 0) - base).abs().max() > 1e-3
    assert (rerun_ablation(model, batch, 1, 0) - base).abs().max() > 1e-3


def test_path_weight_rms_matches_direct(qm9):
    model = tiny(blocks=2)
    ev = collect(OwnModel(model), qm9, EVAL, gradients=True, **{**COMMON, "batch_size": 7})
    batch = collate(qm9, EVAL, None, dtype=torch.float64)
    edges = model.edge_geometry(batch)
    got = OwnModel(model).path_weight_rms(ev.path_moment, ev.num_edges)
    k = 0
    with torch.no_grad():
        for b, block in enumerate(model.blocks):
            w = block.fc(edges.radial)
            start = 0
            for ins in block.tp.instructions:
                n = int(np.prod(ins.path_shape))
                assert got[k]["block"] == b + 1
                assert got[k]["rms"] == pytest.approx(float(w[:, start : start + n].pow(2).mean().sqrt()), rel=1e-9)
                start += n
                k += 1
    assert k == len(got)


def rotated(mols, indices, seed=1):
    """A copy of ``mols`` where each molecule of ``indices`` is rotated by its own random rotation."""
    pos = mols.positions.copy()
    torch.manual_seed(seed)
    for i in indices:
        a, b = mols.atom_ptr[i], mols.atom_ptr[i + 1]
        pos[a:b] = pos[a:b] @ o3.rand_matrix(dtype=torch.float64).numpy().T
    return dataclasses.replace(mols, positions=pos)


def test_rotation_leaves_usage_and_map_inputs_unchanged(qm9):
    model = tiny(orders=(0, 1, 3), mul=2, blocks=2)
    rot = rotated(qm9, np.concatenate([EVAL, TRAIN]))
    ev, rows = rows_of(model, qm9)
    ev_r, rows_r = rows_of(model, rot)
    assert not np.allclose(rot.positions[qm9.atom_ptr[EVAL[0]]], qm9.positions[qm9.atom_ptr[EVAL[0]]])
    for r, rr in zip(rows, rows_r):
        for key in usage.FIELDS:
            if isinstance(r[key], float):
                np.testing.assert_allclose(rr[key], r[key], rtol=1e-7, atol=1e-9, equal_nan=True, err_msg=key)
            else:
                assert r[key] == rr[key]
    for b in range(2):
        inp, inp_r = latent.map_inputs(ev.graph_invariants[b]), latent.map_inputs(ev_r.graph_invariants[b])
        for name in inp:
            np.testing.assert_allclose(inp_r[name], inp[name], rtol=1e-8, atol=1e-10)


def test_probe_recovers_planted_target(qm9):
    model = tiny(orders=(0, 1, 2), mul=4)
    train = collect(OwnModel(model), qm9, TRAIN, gradients=False, **COMMON)
    ev = collect(OwnModel(model), qm9, EVAL, gradients=False, **COMMON)
    w = np.random.default_rng(0).normal(size=4)
    planted_train = train.graph_invariants[-1][2] @ w
    planted_eval = ev.graph_invariants[-1][2] @ w
    r2 = {l: usage.probe_r2(train.graph_invariants[-1][l], planted_train, ev.graph_invariants[-1][l], planted_eval) for l in (0, 1, 2)}
    assert r2[2] > 0.999
    assert r2[0] < 0.9 and r2[1] < 0.9


def test_norm_shares_are_of_the_whole_block_whatever_orders_are_analysed(qm9):
    """Issue 13: ``--orders 0,2`` must not change the l = 0 share; shares are of every order's norm."""
    model = tiny(orders=(0, 1, 2), mul=3, blocks=2)
    _, rows = rows_of(model, qm9)
    _, rows_sub = rows_of(model, qm9, orders=[0, 2])
    full = {(r["block"], r["order"]): r for r in rows if r["block"] != "all"}
    keys = ("norm_share_node", "norm_share_graph")
    for b in (1, 2):
        for key in keys:
            assert sum(full[b, l][key] for l in (0, 1, 2)) == pytest.approx(1.0, rel=1e-12)
            assert full[b, 1][key] > 1e-3  # l = 1 carries part of the norm: leaving it out matters
    sub = [r for r in rows_sub if r["block"] != "all"]
    assert {r["order"] for r in sub} == {0, 2}
    for r in sub:
        for key in keys:
            assert r[key] == pytest.approx(full[r["block"], r["order"]][key], rel=1e-12), (r["block"], r["order"], key)


@pytest.mark.parametrize(
    "eval_indices, probe_molecules",
    [(TRAIN, 20), (TRAIN[:20], 30), (EVAL, 20)],
    ids=["whole-train-split", "part-of-train-split", "test-split"],
)
def test_probe_is_scored_on_held_out_molecules(qm9, monkeypatch, eval_indices, probe_molecules):
    """Issue 14: analysing the training split, the probe must not be scored on molecules it was fit on."""
    calls = []
    real = usage.probe_predictions

    def spy(train_features, train_target, eval_features):
        calls.append((train_features, eval_features))
        return real(train_features, train_target, eval_features)

    monkeypatch.setattr(usage, "probe_predictions", spy)
    model = tiny(orders=(0, 1), mul=3)
    res = analyze_model(
        model, qm9, eval_indices, TRAIN, target="U0_atomization", embedding="pca", map_molecules=10,
        probe_molecules=probe_molecules, ablation_molecules=None, progress=False,
    )  # fmt: skip
    assert calls and any(np.isfinite(r["probe_r2"]) for r in res["rows"])
    for fit, scored in calls:
        # Each molecule's invariant features are distinct, so a shared row is a shared molecule.
        shared = {row.tobytes() for row in fit} & {row.tobytes() for row in scored}
        assert not shared and len(fit) >= 2 and len(scored) >= 2
    assert res["probe_molecules"] + res["probe_scored_molecules"] >= len(eval_indices)
    assert res["probe_scored_molecules"] == len(calls[0][1]) and res["probe_molecules"] == len(calls[0][0])
    assert "not fit on" in res["probe_rule"]


def test_verdict_compares_like_with_like(qm9):
    """Issue 15: the all-blocks delta (measured on the ablation subset) is judged against the MAE on that subset."""
    model = tiny()
    ev_idx = np.arange(100, 140)
    kw = dict(target="U0_atomization", embedding="pca", map_molecules=10, probe_molecules=10, ablation_molecules=8)
    kw["progress"] = False
    res = analyze_model(model, qm9, ev_idx, TRAIN, **kw)
    sub = ev_idx[_subset(len(ev_idx), 8, 0)]
    with torch.no_grad():
        pred = model(collate(qm9, sub, None, dtype=torch.float64)).prediction.numpy()
    sub_mae = usage.mae(pred, qm9.properties["U0_atomization"][sub])
    full_mae = res["model_mae"]
    assert abs(sub_mae - full_mae) > 0.01 * full_mae  # the two MAEs differ: the check is not vacuous
    # A threshold for which the verdict of the order with the largest effect depends on which MAE is used.
    alls = {r["order"]: r["ablation_delta_mae_ev"] for r in res["rows"] if r["block"] == "all"}
    l, delta = max(alls.items(), key=lambda kv: kv[1])
    assert delta > 0
    threshold = delta / np.sqrt(sub_mae * full_mae)
    again = analyze_model(model, qm9, ev_idx, TRAIN, threshold=threshold, **kw)
    row = next(r for r in again["rows"] if r["block"] == "all" and r["order"] == l)
    assert row["ablation_delta_mae_ev"] == pytest.approx(delta, rel=1e-12)
    # The verdict's ratio is to the subset's MAE (its interval is of that ratio), not the whole split's.
    assert row["ablation_delta_rel"] == pytest.approx(delta / sub_mae, rel=1e-9)
    assert row["ablation_delta_rel_lo"] <= row["ablation_delta_rel"] <= row["ablation_delta_rel_hi"]
    assert res["threshold_ev"] == pytest.approx(res["threshold"] * sub_mae, rel=1e-9)
    assert res["ablation_model_mae"] == pytest.approx(sub_mae, rel=1e-9)


def test_verdict_threshold():
    """Verdicts from the interval of ΔMAE / MAE against the 1 % threshold."""
    assert usage.verdict(0.0, 0.0) == "unused"
    assert usage.verdict(0.002, 0.009) == "unused"
    assert usage.verdict(-0.5, -0.1) == "unused"  # the model is better without it
    assert usage.verdict(0.011, 0.02) == "used"
    assert usage.verdict(0.01, 0.01) == "used"  # at the threshold: used, like before
    assert usage.verdict(0.005, 0.02) == "uncertain"


def test_spatial_score():
    s = complexity.spatial_score("C[C@H](O)C1CC1")
    assert all(np.isfinite(v) for v in s.values()) and s["nsps"] > 0
    assert all(np.isnan(v) for v in complexity.spatial_score("not a smiles").values())


def test_structure_scores_see_structure():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y2 = latent.embed_2d(x, "pca")
    good = latent.structure_scores(x, y2, y2[:, 0] + 0.01 * rng.normal(size=300))
    bad = latent.structure_scores(x, y2, rng.normal(size=300))
    assert good["knn_r2"] > 0.9 > bad["knn_r2"]
    assert 0 < good["trustworthiness"] <= 1
    assert np.all(latent.embed_2d(np.ones((20, 3)), "phate") == 0)  # featureless input: no map, no crash


def noisy_curve_with_twins(n: int = 300, twins: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points along a noisy 1-D curve in 6-D (and their curve parameter), then ``twins`` near-copies of every 30th point."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 1, n))
    x = np.stack([np.cos(3 * np.pi * t), np.sin(3 * np.pi * t), 2 * t, np.cos(np.pi * t), t**2, np.zeros(n)], axis=1)
    x += 0.02 * rng.normal(size=x.shape)
    step = n // twins
    return np.concatenate([x, x[::step][:twins] + 1e-6 * rng.normal(size=(twins, 6))]), np.concatenate([t, t[::step][:twins]])


@pytest.mark.parametrize("method", ["phate", "umap"])
def test_phate_and_umap_maps_keep_structure(method):
    """The default embedding (PHATE) and UMAP, run for real on 310 points (each well under 20 s)."""
    x, t = noisy_curve_with_twins()
    y = latent.embed_2d(x, method, seed=0)
    assert y.shape == (310, 2) and np.all(np.isfinite(y))
    dist = np.linalg.norm(y[:, None] - y[None], axis=-1)
    typical = np.median(dist[np.triu_indices(len(y), 1)])
    assert typical > 0
    # near-identical inputs land close together (measured: about 0.015 x the median distance)
    assert np.linalg.norm(y[:300:30] - y[300:], axis=1).max() < 0.1 * typical
    # neighbourhoods in the map follow the curve (measured: knn_r2 0.99, trustworthiness 0.95-0.99)
    scores = latent.structure_scores(x, y, t)
    assert scores["knn_r2"] > 0.9 and scores["trustworthiness"] > 0.9
    np.testing.assert_allclose(latent.embed_2d(x, method, seed=0), y, rtol=1e-6, atol=1e-9)  # seeded: the same map again


def test_analyze_model_orders_and_empty(qm9):
    model = tiny()
    with pytest.raises(IrrepscopeError, match="no order"):
        check_orders([0, 4], model.orders)
    with pytest.raises(IrrepscopeError, match="empty"):
        analyze_model(model, qm9, EVAL[:0], TRAIN, target="U0_atomization", progress=False)
    res = analyze_model(model, qm9, EVAL, TRAIN, orders=[0, 2], target="U0_atomization", embedding="pca", map_molecules=22, progress=False)
    assert {r["order"] for r in res["rows"]} == {0, 2} and res["suggested_orders"][0] == 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("an") / "run"
    tiny_yaml = str(ROOT / "configs" / "quick" / "tiny.yaml")
    assert run_cli("train", tiny_yaml, "--out", str(run), "--quiet", "--set", "data.limit=300", "--set", "train.epochs=1") == 0
    return run


def test_analyze_cli_end_to_end(tiny_run):
    assert run_cli("analyze", str(tiny_run), "--embedding", "pca", "--quiet") == 0
    out = tiny_run / "analysis"
    for name in ("usage.csv", "usage.json", "report.html", "usage.png", "paths.png", "map_joint.png", "map_l1.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == len(list(out.glob("*.png")))  # every image embedded
    assert "suggested pruned order list" in html.lower() or "nothing to prune" in html
    data = json.loads((out / "usage.json").read_text())
    keys = ("orders", "unused_orders", "suggested_orders", "threshold", "threshold_ev", "model_mae", "ablation_model_mae",
            "probe_scored_molecules", "rows", "paths", "maps")  # fmt: skip
    for key in keys:
        assert key in data
    assert set(data["maps"]) == {"l=0", "l=1", "l=2", "joint"}
    lines = (out / "usage.csv").read_text().splitlines()
    assert lines[0].startswith("block,order,norm_share_node") and len(lines) == 1 + 3 * 2 + 3
    assert data["n_molecules"] == 30  # the run's own test split (10 % of 300)


def test_analyze_cli_train_split_scores_the_probe_on_held_out_molecules(tiny_run):
    assert run_cli("analyze", str(tiny_run), "--split", "train", "--max-molecules", "60", "--embedding", "pca", "--quiet") == 0
    data = json.loads((tiny_run / "analysis" / "usage.json").read_text())
    assert data["split"] == "train" and data["n_molecules"] == 60
    # 180 training molecules are not analysed; the probe takes those and 30 of the 60 analysed, scored on the other 30
    assert data["probe_molecules"] == 210 and data["probe_scored_molecules"] == 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--orders", "0,5"], "no order"),
        (["--max-molecules", "0"], "positive integer"),
        (["--orders", "a"], "comma-separated"),
    ],
)
def test_analyze_cli_bad_input(tiny_run, capsys, args, message):
    assert run_cli("analyze", str(tiny_run), "--quiet", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_analyze_cli_missing_checkpoint(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "nockpt"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    shutil.copy(tiny_run / "split.json", run / "split.json")
    assert run_cli("analyze", str(run), "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint not found" in err and "\n" not in err


def test_molecules_without_smiles_need_no_rdkit(monkeypatch):
    """Geometry-only molecules (no SMILES) get NaN colours without importing RDKit (absent on some machines)."""
    import math
    import sys

    from irrepscope.analysis import complexity

    monkeypatch.setitem(sys.modules, "rdkit", None)  # any `import rdkit` now raises ImportError
    assert all(math.isnan(v) for v in complexity.spatial_score("").values())
    with pytest.raises(ImportError):
        complexity.spatial_score("CCO")
