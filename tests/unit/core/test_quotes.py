"""Price quotes: a request's cap from the clearing's prices alone (clear_core.quotes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clear_core.consumption import SIGMA_MIN, _group, runaway_odds
from clear_core.errors import InvalidInputError
from clear_core.policies import parse_policy
from clear_core.quotes import THIN_WINDOW_ROWS, PriceQuote, caps_at_quote, quote_window

T_MAX = 32768


def _window(rng, n, per_query):
    tau = np.exp(rng.normal(6.5, 1.2, n))
    if per_query:
        return np.c_[tau, rng.choice([0.3, 0.5, 0.9], n), rng.choice([0.0, 0.02, 0.1], n), rng.choice([1.0, 2.0], n)]
    return np.c_[tau, np.full(n, 0.5), np.zeros(n), np.ones(n)]


@pytest.mark.parametrize("name", ["clear-cost", "clear"])
def test_a_cleared_window_gets_its_own_caps_back_from_its_quote(name):
    """Every request of the cleared window is re-priced from the quote alone and gets the cap the clearing
    gave it (to the token's rounding), except the queries of the marginal tie the clearing rationed."""
    policy = parse_policy(name)
    rng = np.random.default_rng(7)
    for _ in range(120):
        n = int(rng.integers(THIN_WINDOW_ROWS, 250))
        rows = _window(rng, n, name == "clear-cost")
        b = float(rng.choice([64, 256, 512, 2048, 8000]))
        t_max = float(rng.choice([4096, T_MAX]))
        tau, sig, rho, w = rows.T
        kw = dict(log_sigma=sig, runaway=rho, weights=w) if name == "clear-cost" else dict(log_sigma=0.5)
        cleared = policy.allocate(tau, b * n, context_limit_tokens=t_max, **kw).caps
        quote = quote_window(policy, rows, b, t_max)
        quoted = caps_at_quote(policy, quote, tau, log_sigma=sig, runaway=rho, weights=w, context_limit_tokens=t_max)
        off = np.flatnonzero(np.abs(quoted - cleared) > 1)
        if off.size:  # only a rationed tie: one rounded type, cleared in, quoted out
            types = _group(np.maximum(tau, 1.0), np.maximum(sig, SIGMA_MIN), runaway_odds(rho), w).inverse
            assert name == "clear-cost" and np.unique(types[off]).size == 1
            assert (quoted[off] == 0).all() and (cleared[off] > 0).all()


@pytest.mark.parametrize("name", ["clear-cost", "clear"])
def test_a_higher_quoted_price_never_raises_a_cap(name):
    policy = parse_policy(name)
    rng = np.random.default_rng(3)
    tau = np.exp(rng.normal(6.5, 1.2, 200))
    base = dict(policy=name, full_context=False, budget_per_query_tokens=512.0, window_size=100, log_sigma=0.6)
    prev = None
    for log_price in np.linspace(-14, -4, 21):
        q = PriceQuote(log_price=log_price, log_fill_price=log_price, **base)
        caps = caps_at_quote(policy, q, tau, log_sigma=0.6, context_limit_tokens=T_MAX)
        if prev is not None:
            assert (caps <= prev).all()
        prev = caps
    assert prev.sum() < caps_at_quote(policy, PriceQuote(log_price=-14, log_fill_price=-14, **base), tau,
                                      log_sigma=0.6, context_limit_tokens=T_MAX).sum()


@pytest.mark.parametrize("name", ["clear-cost", "clear"])
def test_a_thin_window_prices_a_request_as_the_central_market_does(name):
    """Below THIN_WINDOW_ROWS the quote carries the window, and a request's cap is the one the central
    window market gives it (clearing the window plus the request), an empty window included."""
    from clear_core.budget import PerQueryBudget
    from clear_core.ledger import TokenLedger
    from clear_core.online_market import OnlineMarket

    policy = parse_policy(name)
    rng = np.random.default_rng(5)
    for k in (0, 1, 5, THIN_WINDOW_ROWS - 1):
        rows = _window(rng, k, name == "clear-cost")
        for tau in (50.0, 400.0, 3000.0):
            market = OnlineMarket(policy, TokenLedger(PerQueryBudget(tokens_per_query=300.0, window_queries=10_000)),
                                  window_size=256, context_limit_tokens=T_MAX, pace=False)
            market._window.extend(tuple(r) for r in rows)
            central = market.request("x", tau, log_sigma=0.5, runaway=0.02 if name == "clear-cost" else 0.0)
            quote = quote_window(policy, rows, 300.0, T_MAX)
            assert len(quote.thin_rows) == k
            quoted = caps_at_quote(policy, quote, [tau], log_sigma=0.5, runaway=0.02 if name == "clear-cost" else 0.0,
                                   context_limit_tokens=T_MAX)[0]
            assert quoted == central.market_cap_tokens, (k, tau)


def test_uniform_quotes_the_per_query_budget_within_the_context():
    policy = parse_policy("uniform")
    q = quote_window(policy, _window(np.random.default_rng(0), 40, False), 700.7, 512)
    assert list(caps_at_quote(policy, q, [1.0, 5000.0], context_limit_tokens=512)) == [512, 512]
    q = quote_window(policy, _window(np.random.default_rng(0), 40, False), 300.9, 4096)
    assert list(caps_at_quote(policy, q, [1.0, 5000.0], context_limit_tokens=4096)) == [300, 300]


def test_a_quote_is_read_by_its_own_policy_only_and_unquotable_policies_are_refused():
    q = quote_window(parse_policy("clear"), _window(np.random.default_rng(0), 10, False), 512.0, T_MAX)
    with pytest.raises(InvalidInputError):
        caps_at_quote(parse_policy("clear-cost"), q, [100.0], log_sigma=0.5)
    with pytest.raises(InvalidInputError):
        quote_window(parse_policy("clear-paper"), np.ones((3, 4)), 512.0, T_MAX)
    assert PriceQuote.from_dict(q.to_dict()) == q
    assert math.isclose(q.shadow_price, math.exp(q.log_price)) or q.shadow_price == 0.0


# -- clear-cost-emp: the market on the calibration's length histograms ------------------------------------------


def _histograms(rng, k=4):
    from clear_core.empirical_market import LengthHistogram

    out = []
    for j in range(k):
        r = rng.normal(0.3 * j - 0.2, 0.4 + 0.25 * j, 400)
        out.append(LengthHistogram.fit(r, rng.random(400) < 0.85 - 0.15 * j, rng.random(400) < 0.03 * j))
    return tuple(out)


def _emp_window(rng, n, k):
    tau = np.exp(rng.normal(6.0, 1.2, n))
    return np.c_[tau, np.zeros(n), np.zeros(n), rng.choice([1.0, 2.0], n), rng.integers(0, k, n)]


def test_an_empirical_quote_gives_a_cleared_window_its_own_caps():
    """Each request of a cleared clear-cost-emp window, re-priced from the quote alone, gets the cap the
    clearing gave it; a difference may only be a marginal request the clearing upgraded with the budget
    its last jump left (quoted below the clearing's cap)."""
    from clear_core.empirical_market import EmpiricalLengths

    policy = parse_policy("clear-cost-emp")
    rng = np.random.default_rng(11)
    hists = _histograms(rng)
    upgraded = 0
    for _ in range(60):
        n = int(rng.integers(THIN_WINDOW_ROWS, 250))
        rows = _emp_window(rng, n, len(hists))
        b = float(rng.choice([64, 256, 512, 2048, 30000]))
        tau, w, bins = rows[:, 0], rows[:, 3], rows[:, 4].astype(int)
        cleared = policy.allocate(tau, b * n, context_limit_tokens=T_MAX, weights=w,
                                  lengths=EmpiricalLengths(hists, bins)).caps
        quote = quote_window(policy, rows, b, T_MAX, lengths=hists)
        quoted = caps_at_quote(policy, quote, tau, weights=w, length_bins=bins, lengths=hists,
                               context_limit_tokens=T_MAX)
        off = np.flatnonzero(quoted != cleared)
        assert (quoted[off] < cleared[off]).all()
        upgraded += off.size
    assert upgraded <= 60  # at most a marginal request or so per clearing


@pytest.mark.parametrize("with_reservations", [False, True])
def test_an_empirical_quote_is_each_request_s_best_response_by_brute_force(with_reservations):
    """At a quoted price lam, a request's cap maximises w P(correct within the cap) - lam E[min(D, cap)] over
    the grid of caps tau exp(u) within the context (cap 0 when nothing beats 0), computed here cell by cell
    from the histogram, without the market's hulls. With a reservation share theta the quote's price nu is
    split into lam = nu (1 - theta) per expected token and mu = nu theta per reserved token, and the cap
    maximises w P - lam E[min(D, cap)] - mu cap."""
    from clear_core.consumption import LOG_TAU_STEP
    from clear_core.empirical_market import LOG_RATIO_GRID

    policy = parse_policy("clear-cost-emp")
    rng = np.random.default_rng(2)
    hists = _histograms(rng)
    base = dict(policy="clear-cost-emp", full_context=False, budget_per_query_tokens=512.0, window_size=100)
    checked = 0
    for _ in range(300):
        tau = math.exp(LOG_TAU_STEP * int(rng.integers(3, 9) / LOG_TAU_STEP))  # on the market's threshold grid
        k, w = int(rng.integers(0, len(hists))), float(rng.choice([1.0, 2.0]))
        nu = math.exp(rng.uniform(-12, -4))
        theta = float(rng.choice([0.03125, 0.25, 0.5, 1.0])) if with_reservations else 0.0
        lam, mu = nu * (1.0 - theta), nu * theta
        t_max = float(rng.choice([4096, T_MAX]))
        h = hists[k]
        good = np.asarray(h.correct)
        mass = good + np.asarray(h.wrong)  # what a cap's cost is computed on
        best_cap, best = 0, 0.0
        for g, u in enumerate(LOG_RATIO_GRID):
            cap = tau * math.exp(u)
            if cap > t_max:
                break
            ends = tau * np.exp(LOG_RATIO_GRID[: g + 1])  # a finished sample costs its cell's upper edge
            cost = float((mass[: g + 1] * ends).sum() + cap * (1.0 - mass[: g + 1].sum()))
            surplus = w * float(good[: g + 1].sum()) - lam * cost - mu * cap
            if surplus > best + 1e-12:
                best_cap, best = int(math.floor(cap + 1e-9)), surplus
        q = PriceQuote(log_price=math.log(nu), log_fill_price=math.log(nu), reservation_share=theta, **base)
        assert math.isclose(q.shadow_price, lam) and math.isclose(q.reservation_price, mu)
        got = caps_at_quote(policy, q, [tau], weights=[w], length_bins=[k], lengths=hists, context_limit_tokens=t_max)
        assert got[0] == best_cap, (tau, k, w, nu, theta, t_max)
        checked += best_cap > 0
    assert 50 < checked < 300  # both abandonments and caps were checked


def test_a_quote_with_requests_in_flight_carries_the_reservation_price_and_gives_the_window_its_caps():
    """With a bound on the mean cap that the window's caps break, the quote carries the clearing's
    reservation share; each row re-priced from the quote alone gets the cap that clearing gave it (a
    marginal upgrade excepted), and those caps keep the bound. Without the bound the same window's quote
    has no reservation price, and its caps break the bound."""
    from clear_core.empirical_market import EmpiricalLengths

    policy = parse_policy("clear-cost-emp")
    rng = np.random.default_rng(21)
    hists = _histograms(rng)
    binding, upgraded = 0, 0
    for _ in range(40):
        n = int(rng.integers(THIN_WINDOW_ROWS, 200))
        rows = _emp_window(rng, n, len(hists))
        b = float(rng.choice([256, 1024, 4096]))
        tau, w, bins = rows[:, 0], rows[:, 3], rows[:, 4].astype(int)
        lengths = EmpiricalLengths(hists, bins)
        free = policy.allocate(tau, b * n, context_limit_tokens=T_MAX, weights=w, lengths=lengths).caps
        bound = 0.5 * free[free > 0].mean()
        cleared = policy.allocate(tau, b * n, context_limit_tokens=T_MAX, weights=w, lengths=lengths,
                                  mean_cap_budget=bound)
        quote = quote_window(policy, rows, b, T_MAX, lengths=hists, mean_cap_budget=bound)
        assert quote.mean_cap_budget == bound
        assert math.isclose(quote.reservation_price, cleared.reservation_price, rel_tol=1e-9)
        assert math.isclose(quote.shadow_price, cleared.shadow_price, rel_tol=1e-9, abs_tol=1e-300)
        if quote.reservation_share > 0:
            binding += 1
            assert quote.reservation_share <= 1
        quoted = caps_at_quote(policy, quote, tau, weights=w, length_bins=bins, lengths=hists,
                               context_limit_tokens=T_MAX)
        off = np.flatnonzero(quoted != cleared.caps)
        assert (quoted[off] < cleared.caps[off]).all()
        upgraded += off.size
        assert quoted[quoted > 0].sum() <= bound * (free > 0).sum() + 1e-6
        unbound = quote_window(policy, rows, b, T_MAX, lengths=hists)
        assert unbound.reservation_share == 0.0 and unbound.reservation_price == 0.0
        loose = caps_at_quote(policy, unbound, tau, weights=w, length_bins=bins, lengths=hists,
                              context_limit_tokens=T_MAX)
        if quote.reservation_share > 0:  # the bound binds: without it the caps break it
            assert loose[loose > 0].mean() > bound
    assert binding >= 30 and upgraded <= 40


def test_a_thin_empirical_window_prices_a_request_as_the_central_market_does():
    from clear_core.budget import PerQueryBudget
    from clear_core.ledger import TokenLedger
    from clear_core.online_market import OnlineMarket

    policy = parse_policy("clear-cost-emp")
    rng = np.random.default_rng(4)
    hists = _histograms(rng)
    for n in (0, 1, 7, THIN_WINDOW_ROWS - 1):
        rows = _emp_window(rng, n, len(hists))
        for tau, k in ((50.0, 0), (400.0, 2), (3000.0, 3)):
            market = OnlineMarket(policy, TokenLedger(PerQueryBudget(tokens_per_query=300.0, window_queries=10_000)),
                                  window_size=256, context_limit_tokens=T_MAX, pace=False, lengths=hists)
            market._window.extend(tuple(r) for r in rows)
            central = market.request("x", tau, length_bin=k)
            quote = quote_window(policy, rows, 300.0, T_MAX, lengths=hists)
            assert len(quote.thin_rows) == n
            quoted = caps_at_quote(policy, quote, [tau], length_bins=[k], lengths=hists, context_limit_tokens=T_MAX)
            assert quoted[0] == central.market_cap_tokens, (n, tau)


def test_an_empirical_quote_refuses_a_request_without_a_valid_bin():
    policy = parse_policy("clear-cost-emp")
    hists = _histograms(np.random.default_rng(0))
    q = quote_window(policy, _emp_window(np.random.default_rng(1), 40, len(hists)), 512.0, T_MAX, lengths=hists)
    for bins in ([len(hists)], [-1], [0.5]):
        with pytest.raises(InvalidInputError):
            caps_at_quote(policy, q, [100.0], length_bins=bins, lengths=hists)
    with pytest.raises(InvalidInputError):
        caps_at_quote(policy, q, [100.0], length_bins=[0], lengths=())


@pytest.mark.parametrize("b", [300.0, 600.0, 2000.0])
def test_exact_thresholds_get_one_answer_in_both_decision_modes(b):
    """A predictor that reports no spread (sigma 0): ``clear`` clears the paper's surge market centrally, and
    its quote carries that market's prices, so a request priced at the ingress gets the cap the central
    market (the window plus the request) gives it, abandonments included."""
    policy = parse_policy("clear")
    rng = np.random.default_rng(7)
    window = np.c_[np.exp(rng.normal(6.0, 0.8, 256)), np.zeros(256), np.zeros(256), np.ones(256)]
    q = quote_window(policy, window, b, T_MAX)
    assert q.log_sigma == 0.0 and math.isfinite(q.beta)
    tau = np.exp(rng.normal(6.0, 0.8, 200))
    quoted = caps_at_quote(policy, q, tau, log_sigma=0.0, context_limit_tokens=T_MAX)
    central = np.array([policy.clear_rows(np.vstack([window, [t, 0.0, 0.0, 1.0]]), b * 257,
                                          context_limit_tokens=T_MAX).caps[-1] for t in tau])
    # One request moves the price by about one part in the window: solvency may differ at the margin only.
    assert np.mean((quoted > 0) == (central > 0)) >= 0.97
    both = (quoted > 0) & (central > 0)
    assert both.sum() >= 20
    np.testing.assert_allclose(quoted[both], central[both], rtol=0.03, atol=2)
    # And it is the paper's market, not a log-normal one with a made-up spread.
    paper = parse_policy("clear-paper").allocate(np.r_[window[:, 0], tau[0]], b * 257, context_limit_tokens=T_MAX)
    assert central[0] == paper.caps[-1]
