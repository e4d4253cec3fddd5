"""Config loading, validation and overrides."""

import glob
from pathlib import Path

import pytest

from irrepscope.config import Config, load_config
from irrepscope.errors import IrrepscopeError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  orders: [0, 3, 4]\n"))
    assert cfg.model.orders == [0, 3, 4] and cfg.train.lr == 1e-3 and cfg.data.split == [0.8, 0.1, 0.1]
    again = load_config(write(tmp_path, cfg.to_yaml(), "again.yaml"))
    assert again == cfg


OTHER_CODES = ("/nequip/", "/mace/")  # configs for nequip-train and mace_run_train, not ours
OURS = [p for p in sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True)) if not any(o in p for o in OTHER_CODES)]


@pytest.mark.parametrize("path", OURS)
def test_shipped_configs_are_valid(path):
    assert isinstance(load_config(path), Config)


def test_shipped_configs_are_found():
    assert len(OURS) >= 20  # paper (9), paper_per_element (9), quick (3): a wrong glob must not pass silently


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"), ["train.epochs=7", "model.orders=[0,2]", "data.limit=100"])
    assert cfg.train.epochs == 7 and cfg.model.orders == [0, 2] and cfg.data.limit == 100


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed\n", "malformed YAML"),
        ("model:\n  ordres: [0, 1]\n", "unknown key model.ordres"),
        ("trainer:\n  epochs: 1\n", "unknown section"),
        ("model:\n  orders: [1, 2]\n", "must contain 0"),
        ("model:\n  orders: [0, -1]\n", "non-negative"),
        ("model:\n  orders: [0, 1, 1]\n", "distinct"),
        ("model:\n  backend: cuda\n", "backend"),
        ("data:\n  split: [0.5, 0.5, 0.5]\n", "sum to 1"),
        ("data:\n  target: nonsense\n", "target"),
        ("train:\n  epochs: 0\n", "positive integer"),
        ("train:\n  lr: .nan\n", "positive number"),
        ("- 1\n- 2\n", "mapping"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    with pytest.raises(IrrepscopeError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("item", ["train.epochs", "epochs=3", "a.b.c=1", "train.nope=1"])
def test_bad_overrides(tmp_path, item):
    with pytest.raises(IrrepscopeError):
        load_config(write(tmp_path, "{}\n"), [item])


def test_missing_config(tmp_path):
    with pytest.raises(IrrepscopeError, match="not found"):
        load_config(tmp_path / "absent.yaml")
