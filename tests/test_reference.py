"""Per-element reference energies, the composition baseline and the training-recipe options."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import write

from helpers import run_cli as cli
from irrepscope.api import analyze_run
from irrepscope.config import Config, config_from_dict, load_config
from irrepscope.data.composition import ELEMENTS, element_counts, fit_composition
from irrepscope.data.split import load_split
from irrepscope.errors import IrrepscopeError
from irrepscope.training.evaluate import evaluate_run, model_from_checkpoint, predict
from irrepscope.training.predict import predict_file
from irrepscope.training.runs import RunDir, load_checkpoint
from irrepscope.training.trainer import Trainer, after_validation, learning_rate

HERE = Path(__file__).parent
TINY = str(HERE.parent / "configs" / "quick" / "tiny.yaml")
LEGACY = HERE / "data" / "legacy_run"  # trained by the code before per-element references (commit 6b8d677)


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY, ["train.threads=1", *overrides])


@pytest.fixture(scope="module")
def per_element_run(tmp_path_factory, qm9):
    out = tmp_path_factory.mktemp("ref") / "run"
    Trainer(tiny_config("data.reference=per_element"), out, mols=qm9, progress=False).run_training()
    return out


# -- the composition fit ------------------------------------------------------------------


def test_element_counts_of_known_molecules(qm9):
    # QM9's first molecules: methane, ammonia, water.
    assert element_counts(qm9, [0, 1, 2]).tolist() == [[4, 1, 0, 0, 0], [3, 0, 1, 0, 0], [2, 0, 0, 1, 0]]


def test_fit_matches_an_independent_least_squares_fit(qm9):
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(1)
    train = np.sort(rng.choice(len(qm9), 3000, replace=False))
    counts = np.array([[np.sum(qm9.structure(i)[0] == z) for z in ELEMENTS] for i in train])  # a plain loop
    y = qm9.properties["U0_atomization"][train]
    ref = LinearRegression(fit_intercept=False).fit(counts, y)
    fit = fit_composition(qm9, train, "U0_atomization")
    np.testing.assert_allclose([fit.per_element[z] for z in ELEMENTS], ref.coef_, rtol=1e-8)
    assert fit.intercept == 0.0
    # An intensive target gets an intercept.
    homo = fit_composition(qm9, train, "homo")
    ref = LinearRegression().fit(counts, qm9.properties["homo"][train])
    assert homo.intercept == pytest.approx(ref.intercept_, rel=1e-8)


def test_reference_is_fitted_on_the_training_split_only(qm9, tmp_path):
    """Plant absurd targets in the validation and test molecules: the fit must not move."""
    config = tiny_config("data.reference=per_element", "train.epochs=1", "train.max_train_batches=1")
    split = __import__("irrepscope.data.split", fromlist=["random_split"]).random_split(
        len(qm9), tuple(config.data.split), seed=config.train.seed, limit=config.data.limit
    )
    planted = qm9.properties["U0_atomization"].copy()
    held_out = np.concatenate([split["val"], split["test"]])
    planted[held_out] += 1000.0 * element_counts(qm9, held_out)[:, 1]  # +1000 eV per carbon
    poisoned = dataclasses.replace(qm9, properties={**qm9.properties, "U0_atomization": planted})
    Trainer(config, tmp_path / "run", mols=poisoned, progress=False).run_training()
    stored = json.loads((tmp_path / "run" / "composition.json").read_text())
    clean = fit_composition(qm9, split["train"], "U0_atomization")
    for symbol, entry in stored["per_element"].items():
        assert entry["value"] == pytest.approx(clean.per_element[entry["z"]], rel=1e-12), symbol
    assert stored["unit"] == "eV" and stored["n_fit"] == len(split["train"])
    model, _, _ = model_from_checkpoint(RunDir.at(tmp_path / "run").checkpoint("best"))
    assert model.element_reference[6].item() == pytest.approx(clean.per_element[6], rel=1e-6)


# -- predictions are the same through every path ------------------------------------------


def test_per_element_predictions_agree_everywhere(per_element_run, qm9, tmp_path):
    run = RunDir.at(per_element_run)
    test = json.loads(run.test.read_text())
    assert test["reference"] == "per_element"
    again = evaluate_run(run.root, mols=qm9)
    assert again["mae_ev"] == pytest.approx(test["mae_ev"], rel=1e-9)
    model, config, state = model_from_checkpoint(run.checkpoint("best"))
    assert torch.count_nonzero(model.element_reference).item() == 5
    assert "element_reference" in state["model"]
    idx = load_split(run.split)["test"][:6]
    direct = predict(model, qm9, idx, config)
    # predict from an .xyz of the same molecules
    path = tmp_path / "same.xyz"
    write(path, [Atoms(numbers=qm9.structure(i)[0], positions=qm9.structure(i)[1]) for i in idx])
    from_file = [r["prediction"] for r in predict_file(run.root, path)]
    np.testing.assert_allclose(from_file, direct, rtol=1e-6)
    # the analysis sees the same predictions: its MAE on the test split is test.json's
    result = analyze_run(run.root, embedding="pca", map_molecules=30, probe_molecules=50, progress=False)
    assert result["model_mae"] == pytest.approx(test["mae_ev"], rel=1e-6)
    assert result["baseline_mae"] == pytest.approx(test["baseline_mae_ev"], rel=1e-9)


def test_baseline_in_test_json_is_an_independent_fit_on_the_same_split(per_element_run, qm9):
    from sklearn.linear_model import LinearRegression

    run = RunDir.at(per_element_run)
    test = json.loads(run.test.read_text())
    split = load_split(run.split)
    counts = lambda idx: np.array([[np.sum(qm9.structure(i)[0] == z) for z in ELEMENTS] for i in idx])  # noqa: E731
    y = qm9.properties["U0_atomization"]
    fit = LinearRegression(fit_intercept=False).fit(counts(split["train"]), y[split["train"]])
    expected = np.mean(np.abs(fit.predict(counts(split["test"])) - y[split["test"]]))
    assert test["baseline_mae_ev"] == pytest.approx(expected, rel=1e-8)
    assert test["mae_ratio_to_baseline"] == pytest.approx(test["mae_ev"] / expected, rel=1e-8)
    assert float(run.read_metrics()[0]["val_baseline_mae_mev"]) > 0


# -- runs written before this change --------------------------------------------------------


def test_a_checkpoint_written_before_the_reference_loads_and_predicts_as_before(qm9, tmp_path):
    state = load_checkpoint(LEGACY / "checkpoints" / "best.pt")
    assert "element_reference" not in state["model"] and "reference" not in state["config"]["data"]
    model, config, _ = model_from_checkpoint(LEGACY / "checkpoints" / "best.pt")
    assert config.data.reference == "none" and config.train.ema_decay is None
    assert torch.count_nonzero(model.element_reference).item() == 0
    recorded = json.loads((LEGACY / "predictions.json").read_text())
    now = predict(model, qm9, np.array(recorded["indices"]), config)
    np.testing.assert_allclose(now, recorded["prediction"], rtol=1e-6)
    # evaluate and resume of such a run work and keep its recipe
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    assert RunDir.at(run).load_config().data.reference == "none"
    test = evaluate_run(run, mols=qm9)
    assert test["mae_ev"] == pytest.approx(json.loads((LEGACY / "test.json").read_text())["mae_ev"], rel=1e-6)
    assert test["reference"] == "none" and test["baseline_mae_ev"] > 0
    assert cli("train", "--resume", str(run), "--quiet", "--set", "train.epochs=3") == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["data"]["reference"] == "none"


def test_none_reproduces_the_published_recipe(qm9, tmp_path):
    """Retraining the legacy run's config with reference none gives the numbers the old code gave."""
    config = load_config(LEGACY / "config.yaml", ["data.reference=none"], run_record=True)
    assert config.train.ema_decay is None  # the published recipe: no average of the weights
    test = Trainer(config, tmp_path / "again", mols=qm9, progress=False).run_training()
    before = json.loads((LEGACY / "test.json").read_text())
    assert test["mae_ev"] == pytest.approx(before["mae_ev"], rel=1e-4)
    old = RunDir.at(LEGACY).read_metrics()
    new = RunDir.at(tmp_path / "again").read_metrics()
    for a, b in zip(old, new):
        assert float(b["val_mae_mev"]) == pytest.approx(float(a["val_mae_mev"]), rel=1e-4)


# -- configuration ---------------------------------------------------------------------------


def test_reference_choice_follows_the_target():
    assert config_from_dict({}).data.reference == "per_element"
    assert config_from_dict({}).train.ema_decay == 0.99  # new configs get the measured recipe
    assert config_from_dict({"data": {"target": "homo"}}).data.reference == "none"
    assert config_from_dict({"data": {"target": "zpve"}}).data.reference == "per_element"
    with pytest.raises(IrrepscopeError, match="intensive"):
        config_from_dict({"data": {"target": "gap", "reference": "per_element"}})
    with pytest.raises(IrrepscopeError, match="data.reference"):
        config_from_dict({"data": {"reference": "atomref"}})


@pytest.mark.parametrize(
    "key, value",
    [("ema_decay", 1.0), ("ema_decay", 0), ("warmup_epochs", -1), ("schedule", "step"), ("plateau_factor", 1.5),
     ("plateau_patience", 0)],
)  # fmt: skip
def test_bad_recipe_options(key, value):
    with pytest.raises(IrrepscopeError, match=f"train.{key}"):
        config_from_dict({"train": {key: value}})


def test_paper_configs_spell_out_the_published_recipe():
    for path in sorted((HERE.parent / "configs" / "paper").glob("*.yaml")):
        cfg = load_config(path)
        assert (cfg.data.reference, cfg.train.schedule, cfg.train.warmup_epochs, cfg.train.ema_decay) == (
            "none", "none", 0, None,
        ), path  # fmt: skip
        twin = load_config(HERE.parent / "configs" / "paper_per_element" / path.name)
        assert twin.data.reference == "per_element"
        twin.data.reference = "none"
        assert twin == cfg, path


# -- recipe options ---------------------------------------------------------------------------


def test_learning_rate_schedules():
    cfg = config_from_dict({"train": {"lr": 1e-3, "epochs": 10, "schedule": "cosine", "warmup_epochs": 2}})
    assert learning_rate(cfg, 0.5) == pytest.approx(1e-3 * 0.25 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert learning_rate(cfg, 5) == pytest.approx(0.5e-3)
    assert learning_rate(cfg, 10) == pytest.approx(0.0, abs=1e-12)
    flat = config_from_dict({"train": {"lr": 1e-3, "schedule": "none"}})
    assert {learning_rate(flat, t) for t in (0.01, 3, 29.9)} == {1e-3}
    plateau = config_from_dict({"train": {"lr": 1e-3, "schedule": "plateau"}})
    assert learning_rate(plateau, 4, plateau_scale=0.25) == pytest.approx(2.5e-4)


def test_reduce_on_plateau():
    cfg = config_from_dict({"train": {"schedule": "plateau", "plateau_patience": 2, "plateau_factor": 0.5}})
    progress = {"best_val_mae": math.inf, "best_epoch": 0, "plateau_scale": 1.0, "plateau_since": 0}
    bests = [after_validation(progress, v, e, cfg) for e, v in enumerate([5, 4, 4.5, 4.2, 4.1, 3.9, 4, 4, 4, 4, 4, 4], 1)]
    assert bests == [True, True, False, False, False, True] + [False] * 6
    # lowered 3 epochs after the best of epoch 2 (at epoch 5), then at epochs 9 and 12
    assert progress["plateau_scale"] == pytest.approx(0.5**3)
    assert progress["best_epoch"] == 6


def test_ema_weights_are_what_gets_saved_and_resumed(qm9, tmp_path):
    recipe = ["data.reference=per_element", "train.ema_decay=0.9", "train.schedule=plateau", "train.plateau_patience=1",
              "train.warmup_epochs=0.5", "train.max_train_batches=6"]  # fmt: skip
    full = Trainer(tiny_config(*recipe, "train.epochs=3"), tmp_path / "full", mols=qm9, progress=False)
    full.run_training()
    state = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert state["ema_updates"] == 18 and "train_model" in state
    differs = [not torch.equal(state["model"][k], state["train_model"][k]) for k in state["model"] if "fc" in k]
    assert any(differs)
    cut = tmp_path / "cut"
    Trainer(tiny_config(*recipe, "train.epochs=1"), cut, mols=qm9, progress=False).run_training()
    Trainer(load_config(cut / "config.yaml", ["train.epochs=3"], run_record=True), cut, mols=qm9, progress=False).run_training(
        resume=True
    )
    resumed = load_checkpoint(cut / "checkpoints" / "last.pt")
    for key in state["model"]:
        torch.testing.assert_close(resumed["model"][key], state["model"][key], rtol=1e-5, atol=1e-6)
    assert resumed["plateau_scale"] == state["plateau_scale"]
    assert [r["val_mae_mev"] for r in RunDir.at(cut).read_metrics()] == [
        r["val_mae_mev"] for r in RunDir.at(tmp_path / "full").read_metrics()
    ]


def test_ema_with_higher_orders_saves_a_loadable_model(qm9, tmp_path):
    # e3nn compiles its products for orders >= 3; the averaged copy must load as a normal model.
    config = load_config(HERE.parent / "configs" / "quick" / "gapped.yaml", ["train.ema_decay=0.9", "train.epochs=1",
                                                                             "train.max_train_batches=2", "train.threads=1"])  # fmt: skip
    test = Trainer(config, tmp_path / "g", mols=qm9, progress=False).run_training()
    model, _, _ = model_from_checkpoint(tmp_path / "g" / "checkpoints" / "best.pt")
    assert math.isfinite(test["mae_ev"]) and model.orders == [0, 3, 4]


def test_report_says_first_when_the_model_does_not_beat_the_baseline():
    from irrepscope.report.analysis import summary_text

    result = {
        "unit": "eV", "n_molecules": 40, "split": "test", "model_mae": 2.5, "baseline_mae": 0.9,
        "mae_ratio_to_baseline": 2.5 / 0.9, "beats_baseline": False, "threshold": 0.01, "threshold_ev": 0.025,
        "ablation_molecules": 40, "unused_orders": [], "suggested_orders": [0, 1], "orders": [0, 1],
        "rows": [{"block": "all", "order": 1, "ablation_delta_mae_ev": 0.3}],
    }  # fmt: skip
    assert summary_text(result).startswith("This model is not clearly better than the composition baseline")
    good = {**result, "model_mae": 0.1, "mae_ratio_to_baseline": 0.1 / 0.9, "beats_baseline": True}
    assert summary_text(good).startswith("The model's MAE is 9.0x lower than the composition baseline's")
