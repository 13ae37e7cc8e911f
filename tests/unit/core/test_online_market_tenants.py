"""clear-cost in the online market: tenant weights, per-tenant counters, pricing of generated tokens."""

from __future__ import annotations

import numpy as np
import pytest

from clear_core.budget import make_budget
from clear_core.errors import InvalidInputError
from clear_core.ledger import TokenLedger
from clear_core.online_market import MAX_TENANTS, OTHER_TENANT, OnlineMarket
from clear_core.policies import get_policy


def run_scarce(weights: dict, n=600, seed=0):
    """Two tenants with the same traffic under a scarce refunding budget (200 tokens/query)."""
    clock = [0.0]
    ledger = TokenLedger(make_budget(mode="per_query", tokens_per_query=200.0, window_queries=100, refund_unused=True),
                         clock=lambda: clock[0])
    m = OnlineMarket(get_policy("clear-cost"), ledger, window_size=128, context_limit_tokens=8192,
                     tenant_weights=weights)
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(6.3, 0.9, n)
    for i in range(n):
        clock[0] += 0.1
        tenant = "gold" if i % 2 else "free"
        d = m.request(f"r{i}", float(lengths[i] * np.exp(rng.normal(0, 0.4))), log_sigma=0.4, tenant=tenant,
                      now=clock[0])
        if d.admitted:
            m.settle(f"r{i}", int(min(d.cap_tokens, lengths[i])))
        assert ledger.state(clock[0]).invariant_holds
    return m


def test_a_heavier_tenant_is_abandoned_less_under_scarcity():
    m = run_scarce({"gold": 4.0})
    gold, free = m.tenants["gold"], m.tenants["free"]
    assert gold.admitted + gold.abandoned == 300 and free.admitted + free.abandoned == 300
    assert free.abandoned > 0  # the budget is scarce
    assert gold.abandoned < 0.5 * free.abandoned, (gold, free)
    # Equal weights: the two tenants' identical traffic is treated alike (within noise).
    even = run_scarce({})
    g, f = even.tenants["gold"], even.tenants["free"]
    assert abs(g.abandoned - f.abandoned) < 0.25 * max(g.abandoned, f.abandoned)


def test_tenant_counters_follow_the_books():
    m = run_scarce({"gold": 2.0}, n=200)
    st = m.ledger.state()
    assert sum(t.allocated_tokens for t in m.tenants.values()) == st.allocated_total
    assert sum(t.generated_tokens for t in m.tenants.values()) == st.generated_total
    assert m.tenants["gold"].weight == 2.0 and m.tenants["free"].weight == 1.0


def test_tenant_names_are_bounded():
    m, clock = OnlineMarket(get_policy("uniform"), TokenLedger(make_budget(mode="per_query", tokens_per_query=50.0,
                                                                          window_queries=10))), 0
    for i in range(MAX_TENANTS + 20):
        m.request(f"r{i}", 100.0, tenant=f"t{i}")
    assert len(m.tenants) == MAX_TENANTS + 1 and m.tenants[OTHER_TENANT].admitted + \
        m.tenants[OTHER_TENANT].abandoned == 20


def test_clear_cost_is_not_scaled_by_the_cap_charge_ratio():
    """Its budget is already one of expected generated tokens: the ratio stays 1 while clear learns it."""
    ratios = {}
    for name in ("clear", "clear-cost"):
        clock = [0.0]
        led = TokenLedger(make_budget(mode="rate", tokens_per_s=2000, burst_tokens=50_000), clock=lambda: clock[0])
        m = OnlineMarket(get_policy(name), led, window_size=64, context_limit_tokens=8192)
        rng = np.random.default_rng(0)
        for i in range(100):
            clock[0] += 0.25
            d = m.request(f"r{i}", float(rng.lognormal(6.2, 0.8)), log_sigma=0.5, now=clock[0])
            if d.admitted:
                m.settle(f"r{i}", d.cap_tokens // 3)
        ratios[name] = m.cap_cost_ratio()
    assert ratios["clear"] > 2.0 and ratios["clear-cost"] == 1.0


def test_unequal_weights_are_refused_by_a_cap_policy():
    ledger = TokenLedger(make_budget(mode="per_query", tokens_per_query=500.0, window_queries=10))
    with pytest.raises(InvalidInputError):
        OnlineMarket(get_policy("clear"), ledger, tenant_weights={"a": 3.0})
    OnlineMarket(get_policy("clear"), ledger, tenant_weights={"a": 1.0})  # equal weights: nothing to weight
    with pytest.raises(InvalidInputError):
        OnlineMarket(get_policy("clear-cost"), ledger, tenant_weights={"a": 0.0})


def test_snapshot_keeps_the_distribution_window_and_tenants():
    m = run_scarce({"gold": 4.0}, n=50)
    again = OnlineMarket(get_policy("clear-cost"), m.ledger, window_size=128, tenant_weights={"gold": 4.0})
    again.restore(m.snapshot())
    assert list(again._window) == list(m._window)
    assert again.tenant_snapshot() == m.tenant_snapshot()
    old = OnlineMarket(get_policy("clear"), m.ledger, window_size=8)
    old.restore({"window": [100.0, 200.0], "outcomes": []})  # a snapshot from before the distributions
    assert old.window().tolist() == [100.0, 200.0]


@pytest.mark.parametrize("refund", [False, True])
def test_a_tenants_generated_tokens_are_what_was_generated_and_its_charge_is_apart(refund):
    """In a budget of caps a request is charged its whole cap: the tenant's generated_tokens still count what
    the engine generated (it used to hold the charge), and charged_tokens what the books took."""
    ledger = TokenLedger(make_budget(mode="per_query", tokens_per_query=600.0, window_queries=10,
                                     refund_unused=refund), clock=lambda: 0.0)
    m = OnlineMarket(get_policy("uniform"), ledger, window_size=8, context_limit_tokens=8192)
    generated = {"a": 400, "b": 484}
    caps = {}
    for rid, n in generated.items():
        d = m.request(rid, 300.0, tenant="t1")
        assert d.admitted
        caps[rid] = d.cap_tokens
        m.settle(rid, n)
    t = m.tenant_snapshot()["t1"]
    assert t["generated_tokens"] == 884
    assert t["charged_tokens"] == (884 if refund else sum(caps.values()))
    assert t["allocated_tokens"] == sum(caps.values())
