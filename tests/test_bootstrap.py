"""The paired bootstrap of usage numbers (irrepscope.analysis.bootstrap) on cases whose answer is known."""

import numpy as np
import pytest

from irrepscope.analysis.bootstrap import (
    interval,
    interval_verdict,
    paired_delta_interval,
    ratio_samples,
    resample_counts,
)
from irrepscope.errors import IrrepscopeError


def _errors(rng, n, effect, noise=0.5):
    """Per-structure |errors| of a model and of its ablation whose true mean difference is ``effect``."""
    error = np.abs(rng.normal(1.0, 0.3, n))
    return error, error + effect + rng.normal(0.0, noise, n)


def test_the_interval_covers_the_true_delta_at_about_its_nominal_rate():
    rng = np.random.default_rng(7)
    trials, covered = 200, 0
    for t in range(trials):
        error, ablated = _errors(rng, 150, effect=0.2)
        lo, hi = paired_delta_interval(error, ablated, resamples=400, seed=t)
        covered += lo <= 0.2 <= hi
    assert 0.90 <= covered / trials <= 0.99  # nominal 0.95; percentile intervals run slightly narrow at n = 150


def test_an_order_without_effect_is_unused_with_an_interval_of_zero_width():
    error = np.abs(np.random.default_rng(0).normal(1.0, 0.3, 50))
    lo, hi = paired_delta_interval(error, error.copy(), relative=True)
    assert lo == hi == 0.0
    assert interval_verdict(lo, hi, threshold=0.01) == "unused"
    # paired: a constant shift of every structure's error is known exactly, whatever the resample
    lo, hi = paired_delta_interval(error, error + 0.2)
    assert lo == pytest.approx(0.2, abs=1e-12) and hi == pytest.approx(0.2, abs=1e-12)


def test_a_small_real_effect_is_uncertain_on_few_structures_and_used_on_many():
    rng = np.random.default_rng(3)
    verdicts = {}
    for n in (20, 20000):
        error, ablated = _errors(rng, n, effect=0.03, noise=0.5)  # 3 % of the MAE of about 1; threshold 1 %
        lo, hi = paired_delta_interval(error, ablated, relative=True, seed=1)
        verdicts[n] = interval_verdict(lo, hi, threshold=0.01)
    assert verdicts == {20: "uncertain", 20000: "used"}


def test_seeds_make_the_intervals_reproducible():
    error, ablated = _errors(np.random.default_rng(5), 100, effect=0.1)
    assert paired_delta_interval(error, ablated, seed=4) == paired_delta_interval(error, ablated, seed=4)
    assert paired_delta_interval(error, ablated, seed=4) != paired_delta_interval(error, ablated, seed=5)


def test_ratio_of_sums_per_resample_and_bad_input():
    counts = resample_counts(4, resamples=3, seed=0)
    assert counts.shape == (3, 4) and (counts.sum(axis=1) == 4).all()
    num, den = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 2.0, 2.0])
    expected = (counts @ num) / (counts @ den)
    np.testing.assert_allclose(ratio_samples(num, den, counts), expected)
    assert interval(np.array([1.0, 2.0, 3.0]), level=0.5) == pytest.approx((1.5, 2.5))
    assert interval_verdict(float("nan"), float("nan"), 0.01) == "absent"
    assert interval_verdict(0.02, 0.05, 0.01) == "used"
    for call in (lambda: resample_counts(0), lambda: interval(np.ones(3), level=1.0),
                 lambda: ratio_samples(num, den[:3], counts)):  # fmt: skip
        with pytest.raises(IrrepscopeError):
            call()
