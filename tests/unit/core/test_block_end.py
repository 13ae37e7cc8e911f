"""The end of a per-query block: a cap leaves every later arrival of the block its share of the paced
budget, and within that bound it is the request's best response (brute force over the grid's caps); the
kernel width that smooths the bins' length histograms (against scipy's Gaussian filter)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from clear_core.budget import make_budget
from clear_core.calibration import fit_calibration
from clear_core.consumption import LOG_TAU_STEP
from clear_core.empirical_market import LOG_RATIO_GRID, LengthHistogram
from clear_core.ledger import TokenLedger
from clear_core.online_market import BLOCK_RESERVE_SHARE, DecisionReason, OnlineMarket
from clear_core.policies import parse_policy
from tests.factories import FakeClock
from tests.fakes import bimodal, curves

LIMIT = 8192
N = 60  # arrivals in the block


def serve_block(reserve: float, *, mode: str = "per_query", generated_share: float = 0.6, seed: int = 0):
    """One block of N arrivals through clear-cost-emp, each settled at once with ``generated_share`` of its
    threshold (a block that runs short, so pacing offers its last arrivals a lot). Per arrival: the decision,
    the pool before it and the arrival's raw threshold and bin."""
    rng = np.random.default_rng(seed)
    hists = (bimodal(seed), bimodal(seed + 1))
    clock = FakeClock()
    if mode == "per_query":
        budget = make_budget(mode="per_query", tokens_per_query=400.0, window_queries=N, refund_unused=True)
    else:
        budget = make_budget(mode="rate", tokens_per_s=400.0, burst_tokens=400.0 * N)
    ledger = TokenLedger(budget, clock=clock)
    market = OnlineMarket(parse_policy("clear-cost-emp"), ledger, window_size=32, context_limit_tokens=LIMIT,
                          lengths=hists, block_reserve=reserve)
    market.seed(np.exp(rng.uniform(4.5, 7.0, 32)), rng.integers(0, 2, 32))
    rows = []
    for i in range(N):
        clock.t += 1.0
        tau, k = float(np.exp(rng.uniform(4.5, 7.0))), int(rng.integers(0, 2))
        before = ledger.available()
        d = market.request(str(i), tau, length_bin=k)
        rows.append((d, before, tau, k))
        if d.admitted:
            market.settle(str(i), int(min(d.cap_tokens, generated_share * tau)))
    return rows, hists


def bound_of(i: int, before: int, b: float, share: float = BLOCK_RESERVE_SHARE) -> float:
    return before - share * (N - 1 - i) * b


def best_cap(h: LengthHistogram, tau: float, price: float, limit: float) -> int:
    """Brute force: the grid cap up to ``limit`` maximising V - price * t * C (0: none is worth its price)."""
    t = math.exp(round(math.log(tau) / LOG_TAU_STEP) * LOG_TAU_STEP)  # the market's rounded threshold
    value, cost = curves(h)
    caps = np.concatenate([[0.0], np.floor(t * np.exp(LOG_RATIO_GRID) + 1e-9)])
    surplus = np.where(caps <= limit, value - price * t * cost, -np.inf)
    return int(caps[int(np.argmax(surplus))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_cap_near_the_end_of_a_block_leaves_each_later_arrival_its_share_and_is_the_best_within_it(seed):
    rows, hists = serve_block(BLOCK_RESERVE_SHARE, seed=seed)
    binding = []
    for i, (d, before, tau, k) in enumerate(rows):
        if i == 0:  # the block's budget arrives with its first request
            continue
        bound = bound_of(i, before, d.budget_per_query_tokens)
        assert d.cap_tokens <= max(bound, 0.0) + 1e-9, (i, d.cap_tokens, bound)
        unbounded = best_cap(hists[k], tau, d.shadow_price, LIMIT)
        if unbounded > bound:  # the bound binds: the best cap within it, or abandoned when none is worth it
            binding.append(i)
            expected = best_cap(hists[k], tau, d.shadow_price, bound)
            assert d.cap_tokens == expected, (i, d.cap_tokens, expected, bound)
            assert d.reason is (DecisionReason.INSOLVENT if expected == 0 else DecisionReason.ADMITTED)
    assert binding and min(binding) >= N // 2, binding  # the test exercises the bound, at the block's end


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_the_reserve_a_late_cap_takes_what_the_later_arrivals_needed(seed):
    rows, _ = serve_block(0.0, seed=seed)
    over = [i for i, (d, before, _, _) in enumerate(rows)
            if i > 0 and d.cap_tokens > bound_of(i, before, d.budget_per_query_tokens)]
    assert len(over) >= 2, over
    assert min(over) >= N // 2  # only the end of the block is affected


def test_the_reserve_changes_nothing_inside_a_block_or_in_a_token_bucket():
    on, _ = serve_block(BLOCK_RESERVE_SHARE)
    off, _ = serve_block(0.0)
    first = next(i for i, (a, b) in enumerate(zip(on, off)) if a[0].cap_tokens != b[0].cap_tokens)
    assert first >= N // 2, first
    on, _ = serve_block(BLOCK_RESERVE_SHARE, mode="rate")
    off, _ = serve_block(0.0, mode="rate")
    assert [r[0].cap_tokens for r in on] == [r[0].cap_tokens for r in off]


def test_a_bad_reserve_is_refused():
    ledger = TokenLedger(make_budget(mode="per_query", tokens_per_query=400.0, window_queries=N), clock=FakeClock())
    with pytest.raises(Exception, match="block_reserve"):
        OnlineMarket(parse_policy("clear-cost-emp"), ledger, lengths=(bimodal(0),), block_reserve=1.5)


@pytest.mark.parametrize("width", [0.125, 0.25, 0.375])  # 3 widths a whole number of cells, as scipy truncates
def test_a_histogram_is_smoothed_by_a_gaussian_of_the_given_width(width):
    rng = np.random.default_rng(3)
    r = rng.normal(0.5, 0.6, 500)  # well inside the grid: nothing falls off its ends
    ok = rng.random(500) < 0.7
    h = LengthHistogram.fit(r, ok, np.zeros(500, dtype=bool), smoothing=width)
    cell = np.searchsorted(LOG_RATIO_GRID, r, side="left")
    step = LOG_RATIO_GRID[1] - LOG_RATIO_GRID[0]
    for mask, got in ((ok, h.correct), (~ok, h.wrong)):
        raw = np.bincount(cell[mask], minlength=LOG_RATIO_GRID.size) / 500.0
        want = gaussian_filter1d(raw, width / step, mode="constant", truncate=3.0)
        assert np.allclose(got, want, atol=1e-12)
    unsmoothed = LengthHistogram.fit(r, ok, np.zeros(500, dtype=bool), smoothing=0.0)
    assert np.allclose(unsmoothed.correct, np.bincount(cell[ok], minlength=LOG_RATIO_GRID.size) / 500.0)


def test_the_calibration_passes_its_kernel_width_to_every_bin():
    rng = np.random.default_rng(4)
    pred = np.exp(rng.uniform(5, 8, 600))
    obs = pred * np.exp(rng.normal(0, 0.5, 600))
    ok = rng.random(600) < 0.6
    narrow = fit_calibration(pred, obs, bins=3, correct=ok, shrink=0.0, smoothing=0.0)
    wide = fit_calibration(pred, obs, bins=3, correct=ok, shrink=0.0, smoothing=0.4)
    for a, b in zip(narrow.histograms, wide.histograms):
        occupied = np.asarray(a.correct) + np.asarray(a.wrong) > 0
        assert occupied.sum() < (np.asarray(b.correct) + np.asarray(b.wrong) > 1e-9).sum()
        assert sum(a.correct) + sum(a.wrong) == pytest.approx(sum(b.correct) + sum(b.wrong))
    with pytest.raises(Exception, match="smoothing"):
        LengthHistogram.fit([0.0], [True], [False], smoothing=-1.0)
