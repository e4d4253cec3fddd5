"""The QM9 cache is keyed by content, not by path; the radial basis and its optional smooth envelope."""

import math

import pytest
import torch
from e3nn.math import soft_one_hot_linspace

from irrepscope.config import ModelConfig, config_from_dict
from irrepscope.data import qm9 as qm9_module
from irrepscope.errors import IrrepscopeError
from irrepscope.model.network import build_model
from irrepscope.model.radial import bessel_basis, polynomial_envelope


def _linked_source(target, source):
    target.mkdir()
    for name in (*qm9_module.SOURCE_FILES, qm9_module.POLARIZABILITY_FILE):
        (target / name).symlink_to(source / name)
    return target


def test_two_installs_share_one_cache(tmp_path, monkeypatch):
    source = qm9_module.qm9pack_data_dir()
    a, b = _linked_source(tmp_path / "venv_a", source), _linked_source(tmp_path / "venv_b", source)
    cache = tmp_path / "cache"
    first = qm9_module.load_qm9(cache, progress=False, source_dir=a)

    def no_parse(*args, **kwargs):
        raise AssertionError("the cache was rebuilt for the same data at another path")

    monkeypatch.setattr(qm9_module, "_parse_source", no_parse)
    second = qm9_module.load_qm9(cache, progress=False, source_dir=b)
    assert len(first) == len(second) == qm9_module.QM9_SIZE


def test_fingerprint_follows_content(tmp_path):
    def fake(folder, text):
        folder.mkdir()
        for name in (*qm9_module.SOURCE_FILES, qm9_module.POLARIZABILITY_FILE):
            (folder / name).write_text(text)
        return folder

    one, same, other = fake(tmp_path / "one", "a,b\n1,2\n"), fake(tmp_path / "same", "a,b\n1,2\n"), fake(tmp_path / "o", "a,b\n1,3\n")
    assert qm9_module._fingerprint(one) == qm9_module._fingerprint(same) != qm9_module._fingerprint(other)


def test_published_basis_is_e3nns_and_is_cut_by_a_step():
    r = torch.linspace(0.05, 7.0, 300, dtype=torch.float64)
    expected = soft_one_hot_linspace(r, 0.0, 6.0, 20, basis="bessel", cutoff=True) * math.sqrt(20)
    torch.testing.assert_close(bessel_basis(r, 6.0, 20), expected)
    # continuous at the cutoff (sin(n pi) = 0) but with a derivative that jumps
    x = torch.tensor([6.0 - 1e-6], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(bessel_basis(x, 6.0, 20).sum(), x)
    assert abs(bessel_basis(x, 6.0, 20)).max() < 1e-4 and abs(slope.item()) > 0.1


def test_polynomial_envelope_is_smooth_at_the_cutoff():
    x = torch.tensor([6.0 - 1e-7], dtype=torch.float64, requires_grad=True)
    value = bessel_basis(x, 6.0, 20, envelope="polynomial")
    (slope,) = torch.autograd.grad(value.sum(), x)
    assert value.abs().max() < 1e-9 and abs(slope.item()) < 1e-9
    r = torch.tensor([0.0, 3.0, 6.0, 7.0], dtype=torch.float64)
    env = polynomial_envelope(r, 6.0)
    assert env[0] == 1 and 0 < env[1] < 1 and env[2] == 0 and env[3] == 0


def test_envelope_option():
    assert config_from_dict({}).model.radial_envelope == "none"
    with pytest.raises(IrrepscopeError, match="model.radial_envelope"):
        config_from_dict({"model": {"radial_envelope": "cosine"}})
    model = build_model(ModelConfig(orders=[0, 1], hidden_mul=2, num_blocks=1, radial_envelope="polynomial"))
    assert model.config.radial_envelope == "polynomial"
