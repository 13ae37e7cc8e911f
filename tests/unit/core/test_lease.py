"""Budget leases and decisions at the ingress (clear_core.lease, the ledger's leases)."""

from __future__ import annotations

import numpy as np
import pytest

from clear_core.budget import PerQueryBudget, TokenBucketBudget
from clear_core.errors import BudgetExhaustedError, InvalidInputError
from clear_core.lease import IngressMarket, LeaseBook, answer_report, lease_target
from clear_core.ledger import TokenLedger
from clear_core.online_market import DecisionReason, OnlineMarket
from clear_core.policies import parse_policy

T_MAX = 32768


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _central(budget, clock, policy="clear-cost", window=64):
    ledger = TokenLedger(budget, clock, lease_ttl_s=10.0)
    return OnlineMarket(parse_policy(policy), ledger, window_size=window, context_limit_tokens=T_MAX)


def test_a_lease_book_never_reserves_past_what_it_holds_and_settles_once():
    book = LeaseBook(refund_unused=True)
    book.set_granted(1000)
    book.reserve("a", 600)
    with pytest.raises(BudgetExhaustedError):
        book.reserve("b", 401)
    s = book.settle("a", 250)
    assert (s.cap, s.generated, s.refunded, s.charged) == (600, 250, 350, 250)
    assert book.settle("a", 250) is None  # idempotent
    assert book.available == 750 and book.held == 750
    cap_book = LeaseBook(refund_unused=False)
    cap_book.set_granted(1000)
    cap_book.reserve("a", 600)
    assert cap_book.settle("a", 250).charged == 600  # a cap budget charges the cap
    cap_book.reserve("b", 300)
    assert cap_book.settle("b", 10, failed=True).charged == 10  # a failure is charged what it generated
    assert cap_book.give_back(10_000) == 390 and cap_book.available == 0


def test_repeated_and_lost_reports_count_nothing_twice():
    clock = Clock()
    market = _central(PerQueryBudget(tokens_per_query=500.0, window_queries=100, refund_unused=True), clock)
    ing = IngressMarket(parse_policy("clear-cost"), "r0", True, T_MAX, lease_block_tokens=5000)
    ing.apply(answer_report(market, ing.report()))
    for i in range(30):
        ask = ing.price(200.0 + 10 * i, log_sigma=0.5, now=clock.t)
        if ing.shortfall(ask):
            ing.apply(answer_report(market, ing.report(extra_tokens=ing.shortfall(ask))))
        d = ing.admit(ask, f"q{i}")
        if d.admitted:
            ing.settle(f"q{i}", 150)
    rep = ing.report()
    answer_report(market, rep)  # the reply is lost ...
    before = market.ledger.state()
    reply = answer_report(market, rep)  # ... and the report sent again
    after = market.ledger.state()
    assert (after.spent, after.arrivals, after.generated_total, after.allocated_total) == (
        before.spent, before.arrivals, before.generated_total, before.allocated_total)
    ing.apply(reply)
    assert after.arrivals == 30
    assert after.spent == ing.lease.charged == 150 * ing.lease.open_reservations() + after.generated_total
    assert after.invariant_holds and after.reconciles
    assert market.tenants["default"].admitted + market.tenants["default"].abandoned == 30


def test_many_replicas_with_lost_replies_a_death_and_a_restart_keep_the_invariant():
    """A random run: 3 ingress replicas decide from quotes and leases, a fifth of the replies are lost,
    one replica dies (it never reports again), the allocator restarts from its last snapshot (written on
    every grant, as the allocator does, and otherwise only now and then). After every step the global
    invariant holds and every replica's reservations fit its lease; at the end the books hold exactly what
    the live replicas charged, and the dead one's unreported charges are within the lease it lost."""
    rng = np.random.default_rng(11)
    clock = Clock()
    policy = parse_policy("clear-cost")
    market = _central(TokenBucketBudget(tokens_per_s=2000.0, burst_tokens=20000.0), clock, window=32)
    reps = [IngressMarket(policy, f"r{k}", True, T_MAX, lease_block_tokens=4000) for k in range(3)]
    snapshot = {}

    def sync(m, extra=0):
        nonlocal snapshot
        lent = market.ledger.state().leased + market.ledger.state().spent
        reply = answer_report(market, m.report(extra_tokens=extra))
        st = market.ledger.state()
        if st.leased + st.spent > lent or rng.random() < 0.05:  # a grant is durable before its reply
            snapshot = {"ledger": market.ledger.snapshot(), "market": market.snapshot()}
        if rng.random() > 0.2:
            m.apply(reply)

    for m in reps:
        reply = answer_report(market, m.report())
        m.apply(reply)
    snapshot = {"ledger": market.ledger.snapshot(), "market": market.snapshot()}
    open_caps, dead, restarted = {}, None, False
    for step in range(600):
        clock.t += 0.01
        if step == 300:
            dead = 2
        if step == 400:
            market = OnlineMarket(policy, TokenLedger.restore(snapshot["ledger"], clock), window_size=32,
                                  context_limit_tokens=T_MAX)
            market.restore(snapshot["market"])
            restarted = True
        k = int(rng.integers(3))
        if k == dead:
            continue
        m = reps[k]
        ask = m.price(float(np.exp(rng.normal(5.5, 1.0))), log_sigma=0.5, now=clock.t)
        if m.shortfall(ask):
            sync(m, m.shortfall(ask))
        d = m.admit(ask, f"{k}-{step}")
        if d.admitted:
            open_caps[f"{k}-{step}"] = (k, d.cap_tokens)
        for rid in [r for r, (kk, _) in open_caps.items() if kk != dead and rng.random() < 0.3]:
            kk, cap = open_caps.pop(rid)
            reps[kk].settle(rid, int(rng.integers(0, cap + 1)))
        if rng.random() < 0.3:
            sync(m)
        st = market.ledger.state()
        assert st.invariant_holds, step
        for r in reps:
            assert 0 <= r.lease.reserved <= r.lease.held
    assert restarted
    for rid, (kk, cap) in list(open_caps.items()):
        if kk != dead:
            reps[kk].settle(rid, cap)
    for k in (0, 1):
        reps[k].apply(answer_report(market, reps[k].report()))
    lost_lease = market.ledger.token_lease("r2")
    reported = lost_lease.charged
    clock.t += 10.0
    for k in (0, 1):  # the live replicas keep reporting; r2's lease lapses
        reps[k].apply(answer_report(market, reps[k].report()))
    market.ledger.release_lapsed()
    st = market.ledger.state()
    assert market.ledger.is_revoked("r2") and market.ledger.token_lease("r2") is None
    assert st.invariant_holds and st.leased == reps[0].lease.held + reps[1].lease.held
    assert st.spent == reps[0].lease.charged + reps[1].lease.charged + reported
    assert 0 <= reps[2].lease.charged - reported <= lost_lease.outstanding


def test_a_lapsed_lease_comes_back_to_the_pool_and_the_owner_is_revoked():
    clock = Clock()
    market = _central(PerQueryBudget(tokens_per_query=1000.0, window_queries=10, refund_unused=True), clock)
    ing = IngressMarket(parse_policy("clear-cost"), "r0", True, T_MAX, lease_block_tokens=4000)
    ing.apply(answer_report(market, ing.report()))
    ask = ing.price(300.0, log_sigma=0.5)
    ing.apply(answer_report(market, ing.report(extra_tokens=max(ing.shortfall(ask), 1))))
    d = ing.admit(ask, "q0")
    assert d.admitted
    ing.apply(answer_report(market, ing.report()))
    st = market.ledger.state()
    assert st.leased == ing.lease.held > 0 and st.lease_reserved == d.cap_tokens
    clock.t += 11.0
    market.ledger.release_lapsed()
    st = market.ledger.state()
    assert st.leased == 0 and st.available == 10 * 1000 and st.reconciles
    reply = answer_report(market, ing.report())
    assert reply.revoked
    with pytest.raises(InvalidInputError):
        ing.apply(reply)


def test_lease_targets_shrink_as_the_pool_drains_and_the_excess_is_given_back():
    clock = Clock()
    market = _central(PerQueryBudget(tokens_per_query=100.0, window_queries=1000, refund_unused=False), clock,
                      policy="uniform")
    a = IngressMarket(parse_policy("uniform"), "a", False, T_MAX, lease_block_tokens=50_000)
    b = IngressMarket(parse_policy("uniform"), "b", False, T_MAX, lease_block_tokens=50_000)
    for m in (a, b):
        m.apply(answer_report(market, m.report()))
    ask = a.price(10.0)
    a.apply(answer_report(market, a.report(extra_tokens=a.shortfall(ask))))
    assert a.admit(ask, "x").admitted
    a.apply(answer_report(market, a.report()))  # the allocator learns of the open cap
    full = lease_target(market.ledger, clock.t)
    assert full == int(0.25 * (100_000 - 100) / 2)  # a quarter of what is left, shared by the two owners
    refused = None
    for i in range(1000):  # drain the pool through b, until what is left idles in a's lease
        ask = b.price(10.0)
        if b.shortfall(ask):
            b.apply(answer_report(market, b.report(extra_tokens=b.shortfall(ask))))
        d = b.admit(ask, f"y{i}")
        if not d.admitted:
            refused = ask
            break
    assert refused is not None and d.reason is DecisionReason.POOL_EMPTY
    assert a.lease.available > 1000  # a still holds its old, large lease
    a.apply(answer_report(market, a.report()))  # a's next report: a small target now ...
    a.apply(answer_report(market, a.report()))  # ... and what it holds beyond it goes back
    assert a.lease_target_tokens < full / 5 and a.lease.available <= a.lease_target_tokens * 1.5 + 1
    b.apply(answer_report(market, b.report(extra_tokens=b.shortfall(refused))))
    assert b.admit(refused, "again").admitted
    assert market.ledger.state().invariant_holds


def test_requests_open_inside_a_lease_price_reservations_in_the_quote():
    """An ingress replica reports how many requests are open inside its lease; the allocator sizes the
    float for them (unspent / (K + 1) per cap, as for its own reservations) and its clear-cost-emp quote
    carries the reservation price, so the caps the window's requests get from it fit that bound. A
    replica that reports none open (an older one) gets quotes without it, whose caps break the bound."""
    from clear_core.empirical_market import lognormal_histogram
    from clear_core.quotes import caps_at_quote

    hists = (lognormal_histogram(0.6, 0.02), lognormal_histogram(1.0, 0.05), lognormal_histogram(1.4, 0.1))

    def run(report_in_flight: bool):
        rng = np.random.default_rng(5)
        clock = Clock()
        ledger = TokenLedger(TokenBucketBudget(tokens_per_s=3000.0, burst_tokens=120_000.0), clock, lease_ttl_s=10.0)
        market = OnlineMarket(parse_policy("clear-cost-emp"), ledger, window_size=64, context_limit_tokens=T_MAX,
                              lengths=hists)
        market.seed(np.exp(rng.uniform(5.0, 7.0, 64)), rng.integers(0, 3, 64))  # past demand: no thin window
        ing = IngressMarket(parse_policy("clear-cost-emp"), "r0", True, T_MAX, lease_block_tokens=200_000,
                            lengths=hists)

        def send(report):
            if not report_in_flight:
                report.in_flight = 0  # a replica that does not report it
            ing.apply(answer_report(market, report))

        send(ing.report())
        seen, used = [], {}  # after each report: (open in the lease, concurrency, quote, window, unspent)
        for i in range(40):
            clock.t = float(i)  # one arrival a second; each request ends 8 arrivals later
            ask = ing.price(float(np.exp(rng.uniform(5.0, 7.0))), length_bin=int(rng.integers(0, 3)), now=clock.t)
            if ing.shortfall(ask):
                send(ing.report(extra_tokens=ing.shortfall(ask)))
            d = ing.admit(ask, f"q{i}")
            used[i] = min(d.cap_tokens, int(2 * ask.threshold_tokens))
            if i >= 8:
                ing.settle(f"q{i - 8}", used[i - 8])
            send(ing.report())
            seen.append((ing.lease.open_reservations(), market.concurrency(), ing.quote, market._window.rows(),
                         market.ledger.unspent()))
        return market, seen

    def window_caps(market, quote, rows):
        caps = caps_at_quote(market.policy, quote, rows[:, 0], weights=rows[:, 3], length_bins=rows[:, 4],
                             lengths=hists, context_limit_tokens=T_MAX)
        return caps[caps > 0]

    market, seen = run(True)
    priced = 0
    for open_now, k, q, rows, unspent in seen:
        assert k >= open_now and q.mean_cap_budget == pytest.approx(unspent / (k + 1))
        if q.reservation_share > 0:
            priced += 1
            assert q.reservation_price > 0
            assert window_caps(market, q, rows).mean() <= q.mean_cap_budget * 1.05  # a marginal upgrade or so
    assert priced >= 20 and seen[-1][0] >= 5
    assert market.last_reservation_price == seen[-1][2].reservation_price
    market0, seen0 = run(False)
    assert all(k == 0 and q.reservation_share == 0 and q.mean_cap_budget is None for _, k, q, _, _ in seen0)
    broke = sum(window_caps(market0, q0, rows).mean() > q.mean_cap_budget
                for (_, _, q0, rows, _), (_, _, q, _, _) in zip(seen0, seen) if q.reservation_share > 0)
    assert broke >= 20
