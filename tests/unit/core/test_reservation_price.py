"""The second price: clear-cost-emp with a budget on the sum of its caps (the tokens held while in flight),
against brute force; the online market pacing open caps at their expected cost and pricing reservations."""

import itertools
from collections import deque

import numpy as np
import pytest

from clear_core.budget import TokenBucketBudget
from clear_core.empirical_market import LOG_RATIO_GRID, EmpiricalLengths, clear_empirical_market, expected_generated_empirical
from clear_core.ledger import TokenLedger
from clear_core.online_market import DecisionReason, OnlineMarket
from clear_core.policies import parse_policy
from tests.fakes import bimodal, curves

LIMIT = 8192


def grid_caps(t: float) -> np.ndarray:
    """The caps of the grid for a (rounded) threshold t, index 0 the origin."""
    return np.concatenate([[0.0], np.floor(t * np.exp(LOG_RATIO_GRID) + 1e-9)])


def window(seed: int, n: int):
    rng = np.random.default_rng(seed)
    hists = (bimodal(seed), bimodal(seed + 1))
    tau = np.exp(rng.uniform(4.5, 7.0, n))
    which = rng.integers(0, 2, n)
    w = rng.choice([1.0, 2.0], n)
    return tau, EmpiricalLengths(hists, which), w


def test_a_cap_budget_the_caps_fit_changes_nothing():
    tau, lengths, w = window(11, 50)
    free = clear_empirical_market(tau, 0.6 * tau.sum(), lengths=lengths, weights=w, context_limit_tokens=LIMIT)
    fit = clear_empirical_market(tau, 0.6 * tau.sum(), lengths=lengths, weights=w, context_limit_tokens=LIMIT,
                                 cap_budget=float(free.caps.sum()))
    assert np.array_equal(free.caps, fit.caps) and fit.reservation_price == 0.0
    assert fit.shadow_price == free.shadow_price


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_caps_fit_their_budget_and_each_is_the_best_response_to_both_prices(seed):
    tau, lengths, w = window(seed, 60)
    budget = 0.9 * tau.sum()
    free = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT)
    cap_budget = 0.45 * free.caps.sum()
    res = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT,
                                 cap_budget=cap_budget)
    assert res.caps.sum() <= cap_budget and res.reservation_price > 0
    expected = expected_generated_empirical(res.caps, tau, lengths)
    assert expected.sum() <= budget * 1.001
    # Brute force over each query's grid: maximise w V - lam t C - mu cap (thresholds rounded as the solver has them).
    lam, mu = res.shadow_price, res.reservation_price
    t = np.exp(np.rint(np.log(tau) * 256) / 256)
    off = 0
    for i in range(tau.size):
        value, cost = curves(lengths.histograms[lengths.which[i]])
        caps = grid_caps(t[i])
        ok = caps <= LIMIT
        surplus = np.where(ok, w[i] * value - lam * t[i] * cost - mu * t[i] * np.concatenate(
            [[0.0], np.exp(LOG_RATIO_GRID)]), -np.inf)
        got = int(np.argmin(np.abs(caps - res.caps[i])))
        if surplus[got] < surplus.max() - 1e-9 * max(1.0, abs(surplus.max())):
            off += 1  # a marginal query, rationed at the boundary (an upgrade the budget left over covered)
    assert off <= 2, off


def test_with_two_queries_no_pair_of_grid_caps_does_better_on_the_same_budgets():
    """Lagrangian sufficiency, checked by enumeration: the market's caps are worth at least every pair of grid
    caps that generates no more expected tokens and holds no more reserved ones."""
    h = bimodal(21)
    tau = np.array([600.0, 1500.0])
    lengths = EmpiricalLengths((h,), np.array([0, 0]))
    res = clear_empirical_market(tau, 1400.0, lengths=lengths, context_limit_tokens=LIMIT, cap_budget=2600.0)
    assert res.caps.sum() <= 2600.0
    value, cost = curves(h)
    t = np.exp(np.rint(np.log(tau) * 256) / 256)
    got_value = sum(value[int(np.argmin(np.abs(grid_caps(t[i]) - res.caps[i])))] for i in range(2))
    got_e = expected_generated_empirical(res.caps, tau, lengths).sum()
    best = 0.0
    caps0, caps1 = grid_caps(t[0]), grid_caps(t[1])
    for a, b in itertools.product(range(caps0.size), range(caps1.size)):
        if caps0[a] + caps1[b] <= res.caps.sum() and t[0] * cost[a] + t[1] * cost[b] <= got_e + 1e-6:
            best = max(best, value[a] + value[b])
    assert got_value >= best - 1e-9


def serve_with_requests_in_flight(policy: str, priced: bool, k: int = 32, n: int = 300) -> tuple[int, int]:
    """A token bucket of 120,000 (3,000 / s), one arrival a second, each request ending k arrivals after its
    own: (requests finished within their caps, requests abandoned with the pool empty)."""
    h = bimodal(9)
    rng = np.random.default_rng(1)
    short = rng.random(n) < 0.4  # the lengths of bimodal()'s bin around a prediction of 500
    true = 500 * np.exp(np.where(short, rng.normal(-1.0, 0.3, n), rng.normal(0.8, 0.4, n)))
    clock = [0.0]
    ledger = TokenLedger(TokenBucketBudget(tokens_per_s=3000.0, burst_tokens=120_000.0), lambda: clock[0])
    emp = policy == "clear-cost-emp"
    market = OnlineMarket(parse_policy(policy), ledger, context_limit_tokens=LIMIT, lengths=(h,) if emp else ())
    if not priced:  # what the market would do without its second budget: no bound on the mean cap
        market.mean_cap_budget = lambda now: None
    running, caps, finished, dry = deque(), {}, 0, 0

    def end(j):
        nonlocal finished
        finished += int(true[j] <= caps[j])
        market.settle(str(j), int(min(true[j], caps[j])))

    for i in range(n):
        clock[0] = float(i)
        d = (market.request(str(i), 500.0, length_bin=0) if emp
             else market.request(str(i), 550.0, log_sigma=0.8, runaway=0.05))
        dry += d.reason is DecisionReason.POOL_EMPTY
        if d.admitted:
            running.append(i)
            caps[i] = d.cap_tokens
        while running and running[0] <= i - k:
            end(running.popleft())
        assert ledger.state().invariant_holds
    while running:
        end(running.popleft())
    return finished, dry


@pytest.mark.parametrize("policy", ["clear-cost", "clear-cost-emp"])
def test_pricing_reservations_keeps_the_bucket_from_running_dry_with_requests_in_flight(policy):
    """32 requests in flight on a bucket that holds about 15 context-limit caps: without the reservation
    price an abundant price gives caps at the context limit and most arrivals find the bucket held by them;
    with it the open caps fit, and far more requests finish within their caps."""
    finished_on, dry_on = serve_with_requests_in_flight(policy, True)
    finished_off, dry_off = serve_with_requests_in_flight(policy, False)
    assert finished_on >= 1.3 * finished_off and dry_on < dry_off


def test_the_lognormal_on_the_grid_is_clear_costs_chance_of_finishing():
    from scipy.stats import norm

    from clear_core.empirical_market import lognormal_histogram, lognormal_lengths

    h = lognormal_histogram(0.6, 0.1)
    assert sum(h.correct) + h.runaway == pytest.approx(1.0) and sum(h.wrong) == 0.0
    value, _ = curves(h)
    for g in (100, 128, 160, 200):  # a cap of tau exp(u_g) finishes with probability (1 - rho) Phi(u_g / sigma)
        assert value[g + 1] == pytest.approx(0.9 * norm.cdf(LOG_RATIO_GRID[g] / 0.6), abs=1e-12)
    lengths = lognormal_lengths(np.array([0.5, 0.501, 1.2]), np.array([0.1, 0.1, 0.0]))
    assert len(lengths.histograms) == 2 and lengths.which[0] == lengths.which[1] != lengths.which[2]


def test_clear_cost_fits_a_cap_budget_and_ignores_one_its_caps_fit():
    policy = parse_policy("clear-cost")
    rng = np.random.default_rng(4)
    tau = np.exp(rng.uniform(5.0, 7.0, 80))
    sig = rng.choice([0.4, 0.8], 80)
    free = policy.allocate(tau, 0.7 * tau.sum(), context_limit_tokens=LIMIT, log_sigma=sig, runaway=0.05)
    mean = free.caps[free.caps > 0].mean()
    same = policy.allocate(tau, 0.7 * tau.sum(), context_limit_tokens=LIMIT, log_sigma=sig, runaway=0.05,
                           mean_cap_budget=float(mean))
    assert np.array_equal(free.caps, same.caps) and same.reservation_price == 0.0
    tight = policy.allocate(tau, 0.7 * tau.sum(), context_limit_tokens=LIMIT, log_sigma=sig, runaway=0.05,
                            mean_cap_budget=0.5 * mean)
    assert tight.reservation_price > 0 and tight.caps[tight.caps > 0].mean() < 0.75 * mean
    # the bound on the sum is the mean times the queries admitted without it (on the grid: within a few)
    assert tight.caps.sum() <= 0.5 * mean * ((free.caps > 0).sum() + 3)
    with pytest.raises(Exception, match="does not price reservations"):
        parse_policy("clear").allocate(tau, tau.sum(), mean_cap_budget=1000.0)


def test_a_mean_cap_budget_is_the_sum_budget_of_the_queries_admitted_without_it():
    tau, lengths, w = window(13, 70)
    budget = 0.8 * tau.sum()
    free = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT)
    mean = 0.6 * free.caps[free.caps > 0].mean()
    by_mean = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT,
                                     mean_cap_budget=mean)
    by_sum = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT,
                                    cap_budget=mean * (free.caps > 0).sum())
    assert np.array_equal(by_mean.caps, by_sum.caps) and by_mean.reservation_price > 0


def test_a_share_hint_finds_the_same_share_as_the_bisection():
    """The search may start at the last clearing's reservation share; wherever it starts, the caps are
    those the full bisection finds."""
    for seed in (31, 32, 33):
        tau, lengths, w = window(seed, 80)
        budget = 0.9 * tau.sum()
        free = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT)
        for share in (0.3, 0.6):
            cap_budget = (1 - share) * free.caps.sum()
            ref = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT,
                                         cap_budget=cap_budget)
            for hint in (0.0, 1 / 32, 0.25, 0.5, 0.97, 1.0):
                got = clear_empirical_market(tau, budget, lengths=lengths, weights=w, context_limit_tokens=LIMIT,
                                             cap_budget=cap_budget, share_hint=hint)
                assert np.array_equal(got.caps, ref.caps), (seed, share, hint)
                assert got.reservation_price == ref.reservation_price
