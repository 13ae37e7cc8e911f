"""How a request enters the market (deployments.market_entry): groups, answer allowances, floors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deployments.market_entry import MarketEntry
from deployments.messages import Prediction


def req(n=1, structured=False, thinking=None):
    return SimpleNamespace(n=n, structured=structured, thinking_token_budget=thinking)


PRED = Prediction(threshold_tokens=300.0, log_sigma=0.5, source="test", raw_threshold_tokens=250.0)


def test_one_plain_choice_is_priced_as_predicted():
    e = MarketEntry.of(req(), 1000)
    assert e.priced(PRED) is PRED
    assert (e.group_client_cap_tokens, e.group_floor_tokens, e.per_choice(777), e.thinking_budget(777)) == (
        1000, 1, 777, None)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_n_choices_are_one_entry_n_times_as_large(n):
    e = MarketEntry.of(req(n=n), 500)
    p = e.priced(PRED)
    assert p.threshold_tokens == n * 300.0 and p.raw_threshold_tokens == n * 250.0 and p.log_sigma == 0.5
    assert e.group_client_cap_tokens == n * 500 and e.per_choice(n * 123 + n - 1) == 123


def test_a_reasoning_choice_is_priced_with_its_answer_allowance_and_keeps_room_to_answer():
    e = MarketEntry.of(req(n=2), 2000, reasoning=True, answer_tokens=200)
    p = e.priced(PRED)
    assert p.threshold_tokens == 2 * (300 + 200)
    assert e.floor_tokens == 201  # one thinking token and the whole allowance
    assert e.per_choice(2 * 700) == 700 and e.thinking_budget(2 * 700) == 500


def test_a_clients_thinking_budget_lowers_the_cap_and_never_raises_it():
    assert MarketEntry.of(req(thinking=50), 2000, reasoning=True, answer_tokens=200).client_cap_tokens == 250
    assert MarketEntry.of(req(thinking=5000), 2000, reasoning=True, answer_tokens=200).client_cap_tokens == 2000


def test_a_small_client_cap_splits_between_thought_and_answer():
    e = MarketEntry.of(req(), 100, reasoning=True, answer_tokens=256)
    assert e.answer_tokens == 50 and e.thinking_budget(100) == 50


def test_a_structured_answer_has_a_floor_but_never_above_what_the_client_asked():
    assert MarketEntry.of(req(structured=True), 1000, structured_floor_tokens=64).floor_tokens == 64
    assert MarketEntry.of(req(structured=True), 20, structured_floor_tokens=64).floor_tokens == 20
    assert MarketEntry.of(req(structured=False), 1000, structured_floor_tokens=64).floor_tokens == 1
    assert MarketEntry.of(req(n=3, structured=True), 1000, structured_floor_tokens=64).group_floor_tokens == 192
