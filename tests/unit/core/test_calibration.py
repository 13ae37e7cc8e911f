"""Calibrated spreads: recover known bias, spread and runaway share; coverage of a known model."""

import numpy as np
import pytest

from clear_core.calibration import (
    Calibration,
    coverage_error,
    coverage_table,
    fit_calibration,
    fold_of,
    quantile_coverage,
    quantile_coverage_error,
)
from clear_core.errors import InvalidInputError


def synthetic(n=20000, seed=0, censor=None):
    """Predictions p; true lengths with a bias and a spread that grow with ln p."""
    rng = np.random.default_rng(seed)
    lp = rng.uniform(4, 8, n)
    bias = 0.1 * (lp - 6)  # long predictions are too short
    sigma = 0.2 + 0.1 * (lp - 4)  # and more uncertain
    d = np.exp(lp + bias + sigma * rng.standard_normal(n))
    if censor is not None:
        d = np.minimum(d, censor)
    return np.exp(lp), d, bias, sigma


def test_recovers_bias_and_spread_per_bin():
    p, d, bias, sigma = synthetic()
    cal = fit_calibration(p, d, bins=8)
    med, sig, run = cal.apply(np.exp([4.5, 6.0, 7.5]))
    want_bias = 0.1 * (np.array([4.5, 6.0, 7.5]) - 6)
    assert np.log(med) - np.log(np.exp([4.5, 6.0, 7.5])) == pytest.approx(want_bias, abs=0.03)
    # The nearest bin's spread (bins are 0.5 wide in ln p: within half a bin of the truth).
    assert sig == pytest.approx(0.2 + 0.1 * (np.array([4.5, 6.0, 7.5]) - 4), abs=0.04)
    assert (run == 0).all()


def test_runaway_share_is_the_censored_share_per_bin():
    censor = float(np.exp(8.0))
    p, d, _, _ = synthetic(censor=censor)
    cal = fit_calibration(p, d, bins=8, censor_tokens=censor)
    ran = d >= censor
    lp = np.log(p)
    top = lp > np.quantile(lp, 7 / 8)
    assert cal.runaway[-1] == pytest.approx(ran[top].mean(), abs=0.01)
    assert cal.runaway[0] == 0.0


def test_weights_equal_duplicated_rows():
    p, d, _, _ = synthetic(n=4000, seed=1)
    w = np.where(p > np.median(p), 2.0, 1.0)
    dup = p > np.median(p)
    a = fit_calibration(p, d, bins=4, weights=w)
    b = fit_calibration(np.concatenate([p, p[dup]]), np.concatenate([d, d[dup]]), bins=4)
    assert a.log_bias == pytest.approx(b.log_bias, abs=0.02)
    assert a.log_sigma == pytest.approx(b.log_sigma, abs=0.02)


def test_quantile_coverage_of_the_true_model_is_the_diagonal():
    p, d, bias, sigma = synthetic(seed=2)
    pairs = quantile_coverage(d, p * np.exp(bias), sigma)
    assert quantile_coverage_error(pairs) < 0.01
    shifted = quantile_coverage(d, p, sigma)  # ignoring the bias is visibly off
    assert quantile_coverage_error(shifted) > 0.02


def test_reliability_of_caps_under_the_true_model():
    p, d, bias, sigma = synthetic(seed=3)
    rng = np.random.default_rng(4)
    caps = p * np.exp(bias + sigma * rng.normal(0, 1, p.size))
    rows = coverage_table(caps, d, p * np.exp(bias), sigma, bins=10)
    assert coverage_error(rows) < 0.02
    assert sum(r.n for r in rows) == p.size


def test_serialisation_and_validation():
    p, d, _, _ = synthetic(n=2000)
    cal = fit_calibration(p, d, bins=4, censor_tokens=3000.0)
    assert Calibration.from_dict(cal.as_dict()) == cal
    with pytest.raises(InvalidInputError):
        Calibration.from_dict({"centres": [1.0, 0.5], "log_bias": [0, 0], "log_sigma": [0.3, 0.3], "n": [1, 1]})
    with pytest.raises(InvalidInputError):
        fit_calibration([100.0] * 10, [100.0] * 10)


def test_folds_are_stable_and_spread():
    folds = [fold_of(f"gsm8k/{i}", 5) for i in range(1000)]
    assert folds == [fold_of(f"gsm8k/{i}", 5) for i in range(1000)]
    assert min(np.bincount(folds)) > 150
