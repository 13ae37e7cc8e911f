"""Shrinking each calibration bin's length histogram towards the whole population's, and the online
market pricing empirical histograms (clear-cost-emp) with the same clearing as the batch."""

import numpy as np
import pytest

from clear_core.budget import PerQueryBudget
from clear_core.calibration import fit_calibration
from clear_core.empirical_market import EmpiricalLengths, LengthHistogram, clear_empirical_market
from clear_core.errors import InvalidInputError
from clear_core.ledger import TokenLedger
from clear_core.online_market import OnlineMarket
from clear_core.policies import parse_policy


def population(seed=0, n=600):
    """Predictions that say little for long queries: a third of them answer briefly."""
    rng = np.random.default_rng(seed)
    pred = np.exp(rng.uniform(4.0, 8.0, n))
    short = (np.log(pred) > 6.5) & (rng.random(n) < 1 / 3)
    obs = np.where(short, np.exp(rng.normal(4.5, 0.3, n)), pred * np.exp(rng.normal(0.0, 0.4, n)))
    obs = np.where(rng.random(n) < 0.05, 8192.0, np.minimum(obs, 8192.0))  # a few never finish
    correct = rng.random(n) < np.where(short, 0.9, 0.5)
    return pred, obs, correct


def test_mixture_is_the_convex_combination_of_the_masses():
    rng = np.random.default_rng(1)
    a = LengthHistogram.fit(rng.normal(0, 0.5, 300), rng.random(300) < 0.7, rng.random(300) < 0.1)
    b = LengthHistogram.fit(rng.normal(1, 0.3, 300), rng.random(300) < 0.2, rng.random(300) < 0.3)
    m = a.mixed(b, 0.25)
    np.testing.assert_allclose(m.correct, 0.75 * np.asarray(a.correct) + 0.25 * np.asarray(b.correct))
    np.testing.assert_allclose(m.wrong, 0.75 * np.asarray(a.wrong) + 0.25 * np.asarray(b.wrong))
    assert m.runaway == pytest.approx(0.75 * a.runaway + 0.25 * b.runaway)
    assert a.mixed(b, 0.0) == a
    with pytest.raises(InvalidInputError):
        a.mixed(b, 1.5)


def test_shrunk_runaway_share_is_the_posterior_mean_of_the_counts():
    """With unit weights the bin's runaway share is (n rho_bin + k rho_all) / (n + k), counted directly."""
    pred, obs, correct = population()
    cap = 8192.0
    k = 50.0
    plain = fit_calibration(pred, obs, bins=4, censor_tokens=cap, correct=correct, shrink=0.0)
    shrunk = fit_calibration(pred, obs, bins=4, censor_tokens=cap, correct=correct, shrink=k)
    rho_all = float(np.mean(obs >= cap))
    assert rho_all > 0  # the population has runaways to pull towards
    for h0, h, n in zip(plain.histograms, shrunk.histograms, plain.n):
        assert h.runaway == pytest.approx((n * h0.runaway + k * rho_all) / (n + k), abs=1e-12)
    # The values that do not come from histograms are untouched.
    assert shrunk.centres == plain.centres and shrunk.log_sigma == plain.log_sigma and shrunk.runaway == plain.runaway


def test_a_problem_s_samples_count_as_one_draw_of_the_prior_s_weight():
    """Each of m problems sampled 8 times, one bin: counted by problem the prior's share is k / (m + k), not
    k / (8 m + k) as it is when every sample counts."""
    pred, obs, correct = population(6, n=200)
    reps, k, cap = 8, 20.0, 8192.0
    p8, o8, c8 = (np.repeat(x, reps) for x in (pred, obs, correct))
    problem = np.repeat(np.arange(pred.size), reps)
    plain = fit_calibration(p8, o8, bins=1, censor_tokens=cap, correct=c8, shrink=0.0)
    centre = plain.centres[0]
    prior = LengthHistogram.fit(np.log(o8) - centre, c8, o8 >= cap)  # every length, as if predicted at the centre
    for clusters, draws in ((problem, pred.size), (None, p8.size)):
        cal = fit_calibration(p8, o8, bins=1, censor_tokens=cap, correct=c8, shrink=k, clusters=clusters)
        w = k / (draws + k)
        expect = plain.histograms[0].mixed(prior, w)
        np.testing.assert_allclose(cal.histograms[0].correct, expect.correct, atol=1e-12)
        assert cal.histograms[0].runaway == pytest.approx(expect.runaway, abs=1e-12)
    assert not np.allclose(plain.histograms[0].correct, prior.correct, atol=1e-3)  # the two shares differ in effect
    with pytest.raises(InvalidInputError):
        fit_calibration(p8, o8, bins=1, correct=c8, shrink=k, clusters=problem[:-1])


def test_a_huge_prior_makes_every_bin_the_population_at_its_centre():
    pred, obs, correct = population(2)
    cal = fit_calibration(pred, obs, bins=4, censor_tokens=8192.0, correct=correct, shrink=1e12)
    d = np.log(np.maximum(obs, 1.0))
    for c, h in zip(cal.centres, cal.histograms):
        prior = LengthHistogram.fit(d - c, correct, obs >= 8192.0)
        np.testing.assert_allclose(h.correct, prior.correct, atol=1e-9)
        np.testing.assert_allclose(h.wrong, prior.wrong, atol=1e-9)


def test_shrinking_keeps_the_short_answers_of_long_predictions():
    """Fitted on few long-predicted samples, the long bin's chance of a correct answer within 150 tokens
    moves towards the population's."""
    from clear_core.empirical_market import LOG_RATIO_GRID

    pred, obs, correct = population(3, n=240)
    # No kernel: the histograms' masses are then the samples' shares, cell by cell.
    plain = fit_calibration(pred, obs, bins=4, correct=correct, shrink=0.0, smoothing=0.0)
    shrunk = fit_calibration(pred, obs, bins=4, correct=correct, shrink=200.0, smoothing=0.0)
    top = len(plain.centres) - 1
    upto = LOG_RATIO_GRID <= np.log(150.0) - plain.centres[top]  # a 150-token cap, relative to the bin's centre
    p_plain = float(np.sum(np.asarray(plain.histograms[top].correct)[upto]))
    p_shrunk = float(np.sum(np.asarray(shrunk.histograms[top].correct)[upto]))
    p_all = float(np.mean((obs <= 150.0) & correct))
    assert p_all > p_plain + 0.01  # the long bin alone says short correct answers are rarer than overall
    w = 200.0 / (plain.n[top] + 200.0)  # the prior's share of the shrunk bin
    assert p_shrunk == pytest.approx((1 - w) * p_plain + w * p_all, abs=0.01)  # up to the 150-token cell's edge


def test_online_market_prices_empirical_histograms_like_the_batch_clearing():
    """Pacing off: each request's cap is the batch clearing of window + request at b per row."""
    pred, obs, correct = population(4)
    cal = fit_calibration(pred, obs, bins=4, censor_tokens=8192.0, correct=correct, shrink=30.0)
    rng = np.random.default_rng(5)
    ledger = TokenLedger(PerQueryBudget(tokens_per_query=400, window_queries=10_000, refund_unused=True))
    market = OnlineMarket(parse_policy("clear-cost-emp"), ledger, window_size=64, context_limit_tokens=8192,
                          pace=False, lengths=cal.histograms)
    rows = []
    for i in range(120):
        tau = float(np.exp(rng.uniform(4, 8)))
        k = int(cal.bin_of([tau])[0])
        d = market.request(f"q{i}", tau, length_bin=k)
        window = rows[-64:] + [(tau, k)]
        ref = clear_empirical_market([t for t, _ in window], 400 * len(window), context_limit_tokens=8192,
                                     lengths=EmpiricalLengths(cal.histograms, np.array([b for _, b in window])))
        expect = int(ref.caps[-1])
        assert d.market_cap_tokens == expect, i
        assert d.shadow_price == pytest.approx(ref.shadow_price)
        rows.append((tau, k))
        if d.admitted:
            market.settle(f"q{i}", min(d.cap_tokens, 300))
    st = ledger.state()
    assert st.invariant_holds and st.reserved == 0
    with pytest.raises(InvalidInputError, match="length_bin"):
        market.request("bad", 300.0)
    # A quote (decisions at the ingress) is the clearing of the window alone, at b per row (pacing off).
    q = market.quote()
    ref = clear_empirical_market([t for t, _ in rows[-64:]], 400 * 64, context_limit_tokens=8192,
                                 lengths=EmpiricalLengths(cal.histograms, np.array([b for _, b in rows[-64:]])))
    assert q.window_size == 64 and q.policy == "clear-cost-emp"
    assert q.shadow_price == pytest.approx(ref.shadow_price)
    # An ingress replica's report rows carry their bin; a row without one, or a bin past the list, is refused.
    for bad in ((300.0, 0.0, 0.0, 1.0), (300.0, 0.0, 0.0, 1.0, float(len(cal.histograms))),
                (300.0, 0.0, 0.0, 1.0, float("nan"))):
        with pytest.raises(InvalidInputError):
            market.absorb([bad])
    arrivals = ledger.arrivals
    market.absorb([(300.0, 0.0, 0.0, 1.0, 1.0)])
    assert ledger.arrivals == arrivals + 1
    with pytest.raises(InvalidInputError, match="histograms"):
        OnlineMarket(parse_policy("clear-cost-emp"), ledger)


def test_held_out_log_likelihood_scores_each_length_by_its_cell_or_the_runaway_share():
    from clear_core.calibration import histogram_log_likelihood
    from clear_core.empirical_market import LOG_RATIO_GRID

    pred, obs, correct = population(6)
    cal = fit_calibration(pred, obs, bins=4, censor_tokens=8192.0, correct=correct)
    rng = np.random.default_rng(7)
    p_new = np.exp(rng.uniform(4, 8, 50))
    o_new = np.where(rng.random(50) < 0.1, 8192.0, p_new * np.exp(rng.normal(0, 0.5, 50)))
    expect = []
    for p, o in zip(p_new, o_new):
        h = cal.histograms[int(cal.bin_of([p])[0])]
        if o >= 8192.0:
            expect.append(np.log(h.runaway))
        else:  # the first grid edge at or above ln(o / p)
            g = int(np.argmax(LOG_RATIO_GRID >= np.log(o) - np.log(p)))
            expect.append(np.log(h.correct[g] + h.wrong[g]))
    got = histogram_log_likelihood(cal, p_new, o_new, censor_tokens=8192.0)
    assert got == pytest.approx(np.mean(expect), rel=1e-9)


def test_a_seeded_window_prices_like_one_filled_by_arrivals():
    """clear-cost-emp's pricing window seeded with (threshold, bin) rows prices the next request as if those
    rows had arrived as requests; a seed without bins is refused."""
    pred, obs, correct = population(7)
    cal = fit_calibration(pred, obs, bins=4, censor_tokens=8192.0, correct=correct, shrink=30.0)
    rng = np.random.default_rng(8)
    taus = np.exp(rng.uniform(4, 8, 40))
    bins = cal.bin_of(taus)

    def market():
        ledger = TokenLedger(PerQueryBudget(tokens_per_query=400, window_queries=10_000, refund_unused=True))
        return OnlineMarket(parse_policy("clear-cost-emp"), ledger, window_size=32, context_limit_tokens=8192,
                            pace=False, lengths=cal.histograms)

    seeded, arrived = market(), market()
    seeded.seed(taus, bins=bins)
    for i, (t, k) in enumerate(zip(taus, bins)):
        arrived.request(f"a{i}", float(t), length_bin=int(k))
    for i, t in enumerate(np.exp(rng.uniform(4, 8, 5))):
        k = int(cal.bin_of([t])[0])
        a = seeded.request(f"n{i}", float(t), length_bin=k)
        b = arrived.request(f"n{i}", float(t), length_bin=k)
        assert a.market_cap_tokens == b.market_cap_tokens and a.shadow_price == pytest.approx(b.shadow_price)
    with pytest.raises(InvalidInputError):
        market().seed(taus)
    with pytest.raises(InvalidInputError):
        market().seed(taus, bins=np.full(taus.size, len(cal.histograms)))
