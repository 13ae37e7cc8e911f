"""The online market: rolling-window pricing, pacing, the ledger check, per-query bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clear_core.budget import make_budget
from clear_core.ledger import TokenLedger
from clear_core.online_market import DecisionReason, OnlineMarket
from tests.factories import FakeClock
from clear_core.policies import get_policy
from clear_core.simulate import score
from clear_core.traces import make_stream



def make_market(policy="clear", b=512.0, w=100, window=64, mode="per_query", pace=True, **spec_kw):
    clock = FakeClock()
    if mode == "per_query":
        budget = make_budget(mode="per_query", tokens_per_query=b, window_queries=w, **spec_kw)
    else:
        budget = make_budget(mode="rate", **spec_kw)
    ledger = TokenLedger(budget, clock=clock)
    return OnlineMarket(get_policy(policy), ledger, window_size=window, context_limit_tokens=8192, pace=pace), clock


def test_uniform_gives_every_request_b():
    m, _ = make_market("uniform", b=300.0, w=50)
    caps = [m.request(str(i), float(t)).cap_tokens for i, t in enumerate(np.linspace(10, 5000, 50))]
    assert caps == [300] * 50


def test_client_max_tokens_lowers_the_cap():
    m, _ = make_market("uniform", b=300.0)
    d = m.request("a", 100.0, client_cap_tokens=120)
    assert (d.cap_tokens, d.market_cap_tokens, d.admitted) == (120, 300, True)


def test_insolvent_request_is_abandoned_by_the_market():
    m, _ = make_market("clear", b=256.0, window=32, pace=False)
    rng = np.random.default_rng(0)
    for i in range(32):
        m.request(f"w{i}", float(rng.uniform(50, 300)))
    d = m.request("hard", 20_000.0)
    assert not d.admitted and d.reason is DecisionReason.INSOLVENT and d.cap_tokens == 0
    assert d.retry_after_s >= 1.0
    assert m.ledger.state().in_flight == 32  # the abandoned one reserved nothing


def test_lone_request_is_priced_against_recent_demand():
    """After a window of easy demand at a tight budget, a hard request is abandoned even alone."""
    m, _ = make_market("clear", b=220.0, window=64, pace=False)
    for i in range(64):
        d = m.request(f"w{i}", 200.0)
        m.ledger.settle(f"w{i}", 200)
    assert m.ledger.state().in_flight == 0  # nothing in flight: a thin market
    assert not m.request("lone", 3000.0).admitted
    assert m.last_price > 0


def test_cap_is_cut_to_available_or_abandoned():
    m, _ = make_market("uniform", b=100.0, w=3, pace=False)
    assert m.request("a", 10.0).cap_tokens == 100  # block credits 300
    m.ledger.reserve("x", 150)  # someone else holds tokens
    d = m.request("b", 10.0)
    assert (d.cap_tokens, d.reason) == (50, DecisionReason.CUT_TO_AVAILABLE)
    d = m.request("c", 10.0)
    assert not d.admitted and d.reason is DecisionReason.POOL_EMPTY


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(["clear", "uniform", "clear-cost"]),
    b=st.sampled_from([128.0, 512.0, 2048.0]),
    seed=st.integers(0, 10_000),
    window=st.sampled_from([0, 16, 64]),
    pace=st.booleans(),
)
def test_per_query_total_allocated_never_exceeds_n_b(policy, b, seed, window, pace):
    rng = np.random.default_rng(seed)
    n = 120
    m, _ = make_market(policy, b=b, w=40, window=window, pace=pace)
    live = []
    allocated = 0
    for i in range(n):
        d = m.request(str(i), float(np.exp(rng.normal(6.5, 1.2))), log_sigma=0.5, client_cap_tokens=int(rng.integers(1, 9000)))
        allocated += d.cap_tokens
        if d.admitted:
            live.append((str(i), d.cap_tokens))
        while live and rng.random() < 0.6:  # requests end out of order, some early
            rid, cap = live.pop(int(rng.integers(len(live))))
            m.ledger.settle(rid, int(cap * rng.uniform(0, 1)))
        s = m.ledger.state()
        assert s.reserved + s.spent <= s.granted
    assert allocated <= n * b + 1e-9
    assert m.ledger.state().allocated_total == allocated


def test_rate_mode_prices_what_the_rate_buys():
    m, clock = make_market("uniform", mode="rate", tokens_per_s=1000.0, burst_tokens=10_000.0, window=16)
    caps = []
    for i in range(16):
        clock.t = i * 0.5  # 2 requests per second -> 500 tokens per request
        caps.append(m.request(str(i), 100.0).cap_tokens)
    assert caps[-1] == pytest.approx(500, abs=40)


def test_online_pricing_tracks_the_offline_batch(main_pool):
    """The live service's pricing rule, run sequentially: within 2 points of the batch."""
    stream = make_stream(main_pool, "balanced", 500, seed=0)
    rng = np.random.default_rng(1)
    tau = stream.tokens.clip(1) * np.exp(rng.normal(0, 0.5, len(stream)))
    b = 512.0
    policy = get_policy("clear")
    offline = policy.allocate(tau, b * len(stream), context_limit_tokens=8192, log_sigma=0.5)
    acc_off = score(offline.caps, stream.tokens, stream.correct, b * len(stream)).accuracy
    m, _ = make_market("clear", b=b, w=len(stream), window=256)
    caps = []
    for i, t in enumerate(tau):
        caps.append(m.request(str(i), float(t), log_sigma=0.5).cap_tokens)
        if i >= 32 and caps[i - 32] > 0:  # admitted, still open: settle it
            m.ledger.settle(str(i - 32), int(min(caps[i - 32], stream.tokens[i - 32])))
    online = score(np.array(caps), stream.tokens, stream.correct, b * len(stream))
    assert online.tokens_allocated <= b * len(stream)
    assert abs(online.accuracy - acc_off) <= 0.02, (online.accuracy, acc_off)


def test_rate_mode_prices_what_caps_really_cost():
    """With refunds, requests that generate half their caps leave the bucket full:
    the market learns the cap / charge ratio and stops abandoning needlessly."""
    from clear_core.online_market import MIN_COST_SAMPLES
    from clear_core.policies import get_policy

    def run(refund: bool):
        clock = [0.0]
        led = TokenLedger(make_budget(mode="rate", tokens_per_s=2000, burst_tokens=50_000, refund_unused=refund),
                          clock=lambda: clock[0])
        m = OnlineMarket(get_policy("clear"), led, window_size=64, context_limit_tokens=8192)
        rng = np.random.default_rng(0)
        abandoned = 0
        for i in range(400):
            clock[0] += 0.25  # 4 requests/s: the refill buys 500 tokens per request
            d = m.request(f"r{i}", float(rng.lognormal(6.2, 0.8)), log_sigma=0.5, now=clock[0])
            if d.admitted:
                m.settle(f"r{i}", d.cap_tokens // 2)  # every request stops at half its cap
            else:
                abandoned += i >= 200
            assert led.state(clock[0]).invariant_holds
        return m, abandoned

    refunding, ab_refund = run(True)
    charged_caps, ab_caps = run(False)
    assert len(refunding._costs) >= MIN_COST_SAMPLES
    assert abs(refunding.cap_cost_ratio() - 2.0) <= 0.2  # caps cost twice what is charged
    assert charged_caps.cap_cost_ratio() == 1.0  # without refunds a cap costs what it is
    assert ab_refund < ab_caps  # pricing real cost abandons fewer in the second half
