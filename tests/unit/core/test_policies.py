"""Every policy: caps are integers that sum to at most the budget; baselines match Appendix A.2."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.consumption import LOG_TAU_STEP, SIGMA_MIN, expected_generated, sigma_grid_index, sigma_of_index
from clear_core.empirical_market import EmpiricalLengths, LengthHistogram, expected_generated_empirical
from clear_core.errors import InvalidInputError, UnknownPolicyError
from clear_core.policies import POLICIES, Truth, get_policy, parse_policy, parse_policy_list

REQUIRED = {"uniform", "proportional", "tale-ep", "heuristic", "auction", "clear", "clear-optimal",
            "clear-triangular", "clear-quadratic", "oracle"}


def test_registry_has_the_paper_names():
    assert REQUIRED <= set(POLICIES)


@settings(max_examples=60, deadline=None)
@given(
    tau=st.lists(st.floats(0, 9000, allow_nan=False), min_size=1, max_size=40),
    bpq=st.floats(0, 5000),
    sigma=st.sampled_from([0.0, 0.3, 1.0]),
    context_limit_tokens=st.one_of(st.none(), st.integers(1, 8192)),
    data=st.data(),
)
def test_every_policy_respects_the_budget(tau, bpq, sigma, context_limit_tokens, data):
    n = len(tau)
    tokens = np.array(data.draw(st.lists(st.integers(0, 9000), min_size=n, max_size=n)))
    correct = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    budget = bpq * n
    # One empirical histogram for every query (clear-cost-emp): the recorded lengths relative to the thresholds.
    ratio = np.log(np.maximum(tokens, 1) / np.maximum(np.asarray(tau), 1.0))
    lengths = EmpiricalLengths((LengthHistogram.fit(ratio, correct, tokens >= 9000),), np.zeros(n, dtype=int))
    for name in POLICIES:
        a = get_policy(name).allocate(tau, budget, context_limit_tokens=context_limit_tokens, truth=Truth(tokens, correct),
                                      log_sigma=sigma, lengths=lengths)
        assert a.caps.dtype.kind == "i", name
        assert (a.caps >= 0).all(), name
        if name == "uniform-generated":  # a budget of generated tokens, not of caps
            assert np.minimum(a.caps, tokens).sum() <= budget, name
        elif name == "clear-cost-emp":  # expected generated tokens under the histogram, for rounded thresholds
            rounded = np.exp(np.rint(np.log(np.maximum(tau, 1.0)) / LOG_TAU_STEP) * LOG_TAU_STEP)
            assert expected_generated_empirical(a.caps, rounded, lengths).sum() <= budget * (1 + 1e-9) + 1e-6, name
        elif name == "clear-cost":  # a budget of expected generated tokens, exact for the rounded instance
            spread = sigma_of_index(int(sigma_grid_index(np.array([max(sigma, SIGMA_MIN)]))[0]))
            rounded = np.exp(np.rint(np.log(np.maximum(tau, 1.0)) / LOG_TAU_STEP) * LOG_TAU_STEP)
            # (up to the linear interpolation of its cost tables, relative 1e-6)
            assert expected_generated(a.caps, rounded, spread).sum() <= budget * (1 + 1e-6) + 1e-6, name
        else:
            assert a.caps.sum() <= budget, name
        if context_limit_tokens is not None:
            assert (a.caps <= context_limit_tokens).all(), name


def test_uniform():
    a = get_policy("uniform").allocate([1.0, 2.0, 3.0], 1000)
    assert a.caps.tolist() == [333, 333, 333]


def test_tale_ep_conserves_the_budget_exactly():
    rng = np.random.default_rng(0)
    for _ in range(50):
        tau = rng.lognormal(6, 1, 30)
        b = int(rng.integers(30, 100_000))
        assert get_policy("tale-ep").allocate(tau, b).caps.sum() == b


def test_proportional_never_abandons_and_follows_thresholds():
    tau = np.array([100.0, 200.0, 400.0])
    a = get_policy("proportional").allocate(tau, 7000)
    assert a.caps.tolist() == [1000, 2000, 4000]
    assert (get_policy("proportional").allocate(tau, 30).caps > 0).all()


def test_heuristic_drops_the_harder_half_only_when_scarce():
    tau = np.array([100.0, 200.0, 300.0, 400.0])
    scarce = get_policy("heuristic").allocate(tau, 0.5 * tau.sum())
    assert scarce.caps[2:].tolist() == [0, 0] and (scarce.caps[:2] > 0).all()
    loose = get_policy("heuristic").allocate(tau, 2 * tau.sum())
    assert (loose.caps > 0).all()
    # Survivors: threshold plus an equal share of what is left.
    assert loose.caps.tolist() == [350, 450, 550, 650]


def test_auction_keeps_the_longest_prefix_that_fits():
    tau = np.array([500.0, 100.0, 300.0, 1000.0])
    a = get_policy("auction").allocate(tau, 950)
    assert a.active.tolist() == [True, True, True, False]
    assert a.caps.sum() == 950


def test_oracle_maximises_solved_count_by_brute_force():
    rng = np.random.default_rng(9)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        d = rng.integers(1, 500, n)
        ok = rng.random(n) < 0.7
        budget = int(rng.integers(0, 1500))
        best = max(
            sum(bool(ok[i]) for i in s)
            for k in range(n + 1) for s in itertools.combinations(range(n), k) if d[list(s)].sum() <= budget
        )
        a = get_policy("oracle").allocate(np.ones(n), budget, truth=Truth(d, ok))
        solved = ((a.caps >= d) & ok & (a.caps > 0)).sum()
        assert solved == best


def test_oracle_needs_the_truth():
    with pytest.raises(InvalidInputError, match="truth"):
        get_policy("oracle").allocate([1.0], 10)


def test_clear_uses_the_uncertainty_and_clear_paper_does_not():
    rng = np.random.default_rng(3)
    tau = rng.lognormal(6.5, 1.0, 200)
    ours = get_policy("clear").allocate(tau, 400 * 200, log_sigma=0.5)
    paper = get_policy("clear-paper").allocate(tau, 400 * 200, log_sigma=0.5)
    exact = get_policy("clear").allocate(tau, 400 * 200, log_sigma=0.0)
    np.testing.assert_array_equal(paper.caps, exact.caps)
    assert not np.array_equal(ours.caps, paper.caps)


def test_policy_specs():
    p = parse_policy("clear-paper:beta=0.01,alpha=4,fill=0")
    assert (p.beta, p.alpha, p.fill_unused) == (0.01, 4.0, False)
    with pytest.raises(UnknownPolicyError, match="nonsense"):
        parse_policy("nonsense")
    with pytest.raises(InvalidInputError, match="takes no parameters"):
        parse_policy("uniform:beta=1")
    with pytest.raises(InvalidInputError, match="gamma"):
        parse_policy("clear:gamma=1")


@pytest.mark.parametrize("param", ["beta=0.01", "alpha=9", "method=bisection", "utility=quadratic", "min_slack=4",
                                   "uncertainty=0"])
def test_clear_refuses_the_surge_parameters_it_would_ignore(param):
    """`clear` prices the log-normal error: alpha, beta, method and utility mean nothing to it."""
    with pytest.raises(InvalidInputError, match="clear parameter"):
        parse_policy(f"clear:{param}")


def test_surge_parameters_change_the_caps():
    rng = np.random.default_rng(11)
    tau = rng.lognormal(6.0, 0.8, 300)
    base = parse_policy("clear-paper").allocate(tau, 500 * 300, log_sigma=0.5).caps
    for spec in ("clear-paper:beta=0.01", "clear-paper:min_slack=200"):
        assert not np.array_equal(parse_policy(spec).allocate(tau, 500 * 300, log_sigma=0.5).caps, base), spec
    # The curve's shape shows at a fixed beta without filling (the adaptive beta and the fill hide it).
    surge = parse_policy("clear-paper:beta=0.01,fill=0").allocate(tau, 500 * 300).caps
    quad = parse_policy("clear-paper:beta=0.01,fill=0,utility=quadratic").allocate(tau, 500 * 300).caps
    assert not np.array_equal(surge, quad)
    # the reference bisection finds the exact solver's allocation
    bis = parse_policy("clear-paper:method=bisection,fill=0").allocate(tau, 500 * 300).caps
    ex = parse_policy("clear-paper:fill=0").allocate(tau, 500 * 300).caps
    assert np.abs(bis - ex).max() <= 1


def test_a_preset_refuses_to_override_what_it_fixes_and_bad_values():
    with pytest.raises(InvalidInputError, match="method"):
        parse_policy("clear-optimal:method=exact")
    with pytest.raises(InvalidInputError, match="utility"):
        parse_policy("clear-quadratic:utility=surge")
    with pytest.raises(InvalidInputError, match="not a valid value"):
        parse_policy("clear-paper:method=newton")
    with pytest.raises(InvalidInputError, match="not a valid value"):
        parse_policy("clear-paper:fill=maybe")


def test_a_policy_list_keeps_each_spec_with_its_parameters():
    assert parse_policy_list("uniform,clear-paper:beta=0.01,alpha=4,fill=0, clear ,oracle") == [
        "uniform", "clear-paper:beta=0.01,alpha=4,fill=0", "clear", "oracle"]
    with pytest.raises(InvalidInputError, match="no policy before it"):
        parse_policy_list("beta=0.01,clear")
    with pytest.raises(InvalidInputError):
        parse_policy_list("clear,clear:beta=1")


def test_market_policies_report_their_solver_honestly():
    rng = np.random.default_rng(2)
    tau = rng.lognormal(6.5, 1.0, 200)
    ours = parse_policy("clear").allocate(tau, 300 * 200, log_sigma=0.5)
    assert ours.converged and ours.iterations > 0  # the price bisection ran
    paper = parse_policy("clear-paper:method=bisection").allocate(tau, 300 * 200)
    assert paper.converged and 0 < paper.iterations <= 40


def test_uniform_generated_is_the_largest_uniform_cap_within_a_generated_token_budget():
    """Against a scan of every cap on small random streams."""
    from clear_core.simulate import uniform_cap_within

    rng = np.random.default_rng(5)
    for _ in range(200):
        tokens = rng.integers(0, 60, size=int(rng.integers(1, 8)))
        target = float(rng.integers(0, 200))
        limit = int(rng.integers(1, 80))
        ok = [c for c in range(0, limit + 1) if np.minimum(c, tokens).sum() <= target]
        assert uniform_cap_within(tokens, target, limit) == max(ok), (tokens, target, limit)
        caps = get_policy("uniform-generated").allocate(np.ones(tokens.size), target, context_limit_tokens=limit,
                                                        truth=Truth(tokens, np.ones(tokens.size, bool))).caps
        assert set(caps.tolist()) == {max(ok)}
