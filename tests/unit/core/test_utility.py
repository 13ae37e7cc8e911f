"""Utility curves against their closed forms (Eqs. 1, 3, 5 and the solvency rule)."""

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from clear_core.errors import InvalidInputError
from clear_core.utility import Quadratic, ShiftedSurge, Triangular, lambertw_real, make_utility

CURVES = [ShiftedSurge(alpha=2.0, beta=1 / 200), Triangular(alpha=2.0, beta=1 / 200), Quadratic(alpha=2.0, beta=1 / 200)]


def test_lambertw_identity_and_range():
    z = np.linspace(0, 50, 101)
    w = lambertw_real(z)
    assert_allclose(w * np.exp(w), z, rtol=1e-12, atol=1e-14)
    with pytest.raises(InvalidInputError, match="lambertw"):
        lambertw_real(-1.0)


@pytest.mark.parametrize("beta", [1 / 16, 1 / 300, 1 / 4000])
def test_surge_peak_at_tau_plus_inverse_beta_when_price_vanishes(beta):
    c = ShiftedSurge(alpha=2.0, beta=beta)
    assert_allclose(c.slack(1e-12), 1 / beta, rtol=1e-9)
    # The peak of u is where its derivative vanishes: brute-force it on a grid.
    x = np.linspace(0, 5 / beta, 200001)
    assert_allclose(x[np.argmax(c.gain(x))], 1 / beta, rtol=1e-4)


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_nobody_active_at_or_above_alpha(curve):
    for lam in (curve.alpha, 1.5 * curve.alpha, 10 * curve.alpha):
        assert curve.solvency_threshold(lam) == 0.0
        assert (curve.surplus(lam, np.array([0.0, 1.0, 100.0, 5000.0])) <= 0).all()


@pytest.mark.parametrize("lam", [0.001, 0.01, 0.1, 0.5, 1.0, 1.9])
def test_surge_first_order_condition(lam):
    """u'(t*) = lam at the Lambert-W cap (Shadow Price Parity, Eq. 3)."""
    c = ShiftedSurge(alpha=2.0, beta=1 / 200)
    x = float(c.slack(lam))
    h = 1e-4
    derivative = (c.gain(x + h) - c.gain(x - h)) / (2 * h)
    assert_allclose(derivative, lam, rtol=1e-6)


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_closed_form_solvency_matches_direct_surplus(curve):
    """tau < T(lam)  <=>  u(t*) - lam t* > 0, checked on a grid away from the boundary."""
    taus = np.linspace(0, 3000, 601)
    for lam in np.linspace(0.01, 1.99, 40):
        T = float(curve.solvency_threshold(lam))
        s = curve.surplus(lam, taus)
        away = np.abs(taus - T) > 1e-6 * max(T, 1)
        assert ((taus < T) == (s > 0))[away].all()


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_inverse_maps(curve):
    taus = np.array([0.0, 1.0, 37.0, 500.0, 4096.0])
    lam = curve.price_at_threshold(taus)
    assert (lam <= curve.alpha + 1e-12).all()
    # T(lam) recovers tau where T is continuous (not the triangular's kink at alpha).
    inside = lam < curve.alpha
    assert_allclose(curve.solvency_threshold(lam[inside]), taus[inside], rtol=1e-8, atol=1e-7)
    if curve.name != "triangular":  # the triangular's slack is constant: no inverse to check
        for x in (0.0, 10.0, 100.0, 199.0):
            assert_allclose(curve.slack(curve.price_at_slack(x)), x, rtol=1e-9, atol=1e-9)


def test_slack_and_threshold_are_non_increasing():
    lams = np.linspace(0, 2.5, 500)
    for c in CURVES:
        assert (np.diff(c.slack(lams)) <= 1e-12).all()
        assert (np.diff(c.solvency_threshold(lams[1:])) <= 1e-9).all()


def test_closed_form_solvency_threshold_of_the_surge():
    """T(lam) = (1 - W)^2 / (beta W) with W = W0(lam e / alpha)."""
    c = ShiftedSurge(alpha=3.0, beta=1 / 100)
    lam = 0.3
    w = float(lambertw_real(lam * math.e / 3.0))
    assert_allclose(c.solvency_threshold(lam), (1 - w) ** 2 / (w / 100), rtol=1e-12)


def test_bad_parameters_raise_naming_the_value():
    with pytest.raises(InvalidInputError, match="alpha"):
        ShiftedSurge(alpha=0.0)
    with pytest.raises(InvalidInputError, match="beta"):
        Quadratic(beta=float("nan"))
    with pytest.raises(InvalidInputError, match="utility"):
        make_utility("cubic", 2.0, 0.01)
