"""A ledger continued under another budget (TokenLedger.rebudget): what happened stays, the new budget
credits from its next block (per query) or refills from its level (rate). Checked against hand counts."""

from __future__ import annotations

import random

import pytest

from clear_core.budget import PerQueryBudget, TokenBucketBudget
from clear_core.ledger import TokenLedger


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _arrive(led, n):
    for _ in range(n):
        led.arrive()


def test_per_query_to_per_query_applies_from_the_next_block():
    led = TokenLedger(PerQueryBudget(tokens_per_query=100, window_queries=10))
    _arrive(led, 13)  # blocks opened at arrivals 1 and 11
    assert led.state().granted == 2 * 10 * 100
    led.reserve("a", 700)
    led.settle("a", 500)  # charged its whole cap: per-query budgets count caps by default
    spent = led.state().spent
    led.rebudget(PerQueryBudget(tokens_per_query=7, window_queries=4))
    assert led.state().granted == 2000 and led.state().spent == spent == 700
    _arrive(led, 7)  # arrivals 14-20 finish the old block: nothing new
    assert led.state().granted == 2000
    led.arrive()  # arrival 21 opens a block of the new budget: 4 x 7
    assert led.state().granted == 2000 + 28
    _arrive(led, 3)
    assert led.state().granted == 2028
    led.arrive()  # arrival 25: the second new block
    assert led.state().granted == 2056


def test_a_change_at_a_block_boundary_applies_at_the_next_arrival():
    led = TokenLedger(PerQueryBudget(tokens_per_query=100, window_queries=10))
    _arrive(led, 10)  # exactly one whole block
    led.rebudget(PerQueryBudget(tokens_per_query=50, window_queries=5))
    led.arrive()
    assert led.state().granted == 1000 + 250


def test_two_changes_in_one_block_keep_the_first_blocks_end():
    led = TokenLedger(PerQueryBudget(tokens_per_query=100, window_queries=10))
    _arrive(led, 3)
    led.rebudget(PerQueryBudget(tokens_per_query=10, window_queries=4))  # the next block opens at arrival 11
    led.rebudget(PerQueryBudget(tokens_per_query=1, window_queries=6))  # nothing arrived since: still at 11
    _arrive(led, 7)
    assert led.state().granted == 1000
    led.arrive()
    assert led.state().granted == 1006


def test_per_query_to_rate_cuts_the_level_to_the_burst_but_never_below_what_is_in_flight():
    clock = Clock()
    led = TokenLedger(PerQueryBudget(tokens_per_query=100, window_queries=10, refund_unused=True), clock=clock)
    led.arrive()  # 1,000 granted
    led.reserve("a", 600)
    led.settle("a", 100)  # spent 100, level 900
    led.reserve("b", 300)
    led.rebudget(TokenBucketBudget(tokens_per_s=10, burst_tokens=200))
    st = led.state()
    # The level (granted - spent) is cut to max(burst 200, reserved 300) = 300: nothing is available now.
    assert st.granted == 100 + 300 and st.spent == 100 and st.reserved == 300 and st.available == 0
    clock.t = 5.0  # the bucket holds 300 >= burst: no refill until it drains below the burst
    assert led.available() == 0
    led.settle("b", 250)  # charged 250, 50 refunded to the bucket: level 50
    clock.t = 10.0  # 5 s at 10 tokens/s: +50, level 100 (below the burst)
    assert led.available() == 100


def test_rate_to_per_query_opens_a_block_at_the_next_arrival():
    clock = Clock()
    led = TokenLedger(TokenBucketBudget(tokens_per_s=0, burst_tokens=500), clock=clock)
    _arrive(led, 7)
    led.reserve("a", 100)
    led.settle("a", 100)
    led.rebudget(PerQueryBudget(tokens_per_query=10, window_queries=3))
    assert led.state().granted == 500  # what was credited stays credited
    led.arrive()
    assert led.state().granted == 530 and led.budget_arrivals == 1


def test_the_change_survives_a_snapshot():
    led = TokenLedger(PerQueryBudget(tokens_per_query=100, window_queries=10))
    _arrive(led, 4)
    led.rebudget(PerQueryBudget(tokens_per_query=5, window_queries=2))
    back = TokenLedger.restore(led.snapshot())
    assert back.budget == led.budget and back.budget_arrivals == led.budget_arrivals == -6
    _arrive(back, 6)
    assert back.state().granted == 1000
    back.arrive()
    assert back.state().granted == 1010


@pytest.mark.parametrize("seed", range(5))
def test_random_commands_and_changes_keep_the_invariant_and_never_forget_spent(seed):
    rng = random.Random(seed)
    clock = Clock()
    budgets = [PerQueryBudget(tokens_per_query=rng.choice([10, 50, 200]), window_queries=rng.choice([1, 3, 8]),
                              refund_unused=rng.random() < 0.5) for _ in range(3)]
    budgets += [TokenBucketBudget(tokens_per_s=rng.choice([0, 5, 50]), burst_tokens=rng.choice([100, 1000]))
                for _ in range(2)]
    led = TokenLedger(budgets[0], clock=clock)
    open_: dict[str, int] = {}
    spent_before = 0
    for step in range(600):
        clock.t += rng.random()
        op = rng.random()
        if op < 0.35:
            led.arrive()
        elif op < 0.65:
            cap = rng.randint(1, 300)
            if led.available() >= cap:
                led.reserve(f"r{step}", cap)
                open_[f"r{step}"] = cap
        elif op < 0.9 and open_:
            rid = rng.choice(sorted(open_))
            led.settle(rid, rng.randint(0, open_.pop(rid)))
        elif op < 0.95:
            led.rebudget(rng.choice(budgets))
        st = led.state()
        assert st.invariant_holds and st.reconciles
        assert st.spent >= spent_before  # nothing spent is ever forgotten
        assert st.reserved == sum(open_.values())
        spent_before = st.spent
