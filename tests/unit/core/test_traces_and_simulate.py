"""Trace pools, tiers, streams and the simulator, on the real shared pool."""

import json
from collections import Counter

import numpy as np
import pytest

from clear_core.errors import InvalidInputError, TraceFormatError
from clear_core.simulate import score
from clear_core.traces import MIXTURES, TIERS, load_pool, make_stream, tier_counts, tier_of


def test_pool_matches_its_readme(main_pool):
    # shared/data/traces/README.md: 1,889 problems, 2,369 samples; GSM8K 1,319.
    assert len(main_pool) == 1889
    datasets = Counter(p.dataset for p in main_pool)
    assert datasets == {"gsm8k": 1319, "math500": 500, "amc23": 40, "aime": 30}
    gsm = [s.tokens for p in main_pool if p.dataset == "gsm8k" for s in p.samples]
    assert 200 < np.mean(gsm) < 280  # README: GSM8K mean 237 tokens


def test_tiers():
    assert tier_of("gsm8k", None) == "easy"
    assert [tier_of("math500", lv) for lv in (1, 3, 4, 5)] == ["moderate", "moderate", "hard", "hard"]
    assert tier_of("amc23", None) == "hard" and tier_of("aime", None) == "very_hard"
    with pytest.raises(TraceFormatError):
        tier_of("olympiad", None)


@pytest.mark.parametrize("mixture", sorted(MIXTURES))
def test_stream_follows_its_mixture(main_pool, mixture):
    s = make_stream(main_pool, mixture, 500, seed=3)
    assert len(s) == 500
    counts = Counter(s.tiers)
    assert [counts.get(t, 0) for t in TIERS] == tier_counts(500, MIXTURES[mixture])
    # Every query is a real (problem, sample) pair of the pool.
    by_id = {p.id: p for p in main_pool}
    for pid, j, tok, ok in zip(s.problem_ids, s.sample_index, s.tokens, s.correct):
        assert by_id[pid].samples[j].tokens == tok and by_id[pid].samples[j].correct == ok


def test_stream_is_seeded_and_draws_with_replacement_only_when_needed(main_pool):
    a, b = make_stream(main_pool, "balanced", 500, 1), make_stream(main_pool, "balanced", 500, 1)
    assert a.query_ids == b.query_ids
    assert a.query_ids != make_stream(main_pool, "balanced", 500, 2).query_ids
    easy = [q for q, t in zip(a.query_ids, a.tiers) if t == "easy"]
    assert len(easy) == len(set(easy))  # 125 of 1,319: without replacement
    hard = make_stream(main_pool, "mostly-hard", 500, 1)
    vh = [q for q, t in zip(hard.query_ids, hard.tiers) if t == "very_hard"]
    assert len(vh) == 275 and len(set(vh)) < 275  # only 240 AIME pairs: with replacement


def test_tier_counts_sum():
    assert sum(tier_counts(501, (0.55, 0.25, 0.15, 0.05))) == 501


def test_bad_pool_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "dataset": "gsm8k", "problem": "p", "samples": []}) + "\n")
    with pytest.raises(TraceFormatError, match="no samples"):
        load_pool(bad)
    bad.write_text("{not json\n")
    with pytest.raises(TraceFormatError, match=":1:"):
        load_pool(bad)


def test_bad_stream_arguments(main_pool):
    with pytest.raises(InvalidInputError, match="stream"):
        make_stream(main_pool, "mostly-medium")
    with pytest.raises(InvalidInputError, match="n"):
        make_stream(main_pool, "balanced", 0)


def test_score_against_a_direct_loop():
    rng = np.random.default_rng(0)
    caps = rng.integers(0, 1000, 300)
    tokens = rng.integers(1, 1000, 300)
    correct = rng.random(300) < 0.8
    s = score(caps, tokens, correct, 200_000)
    solved = sum(1 for c, t, ok in zip(caps, tokens, correct) if c > 0 and c >= t and ok)
    consumed = sum(min(c, t) for c, t in zip(caps, tokens))
    assert s.solved == solved and s.accuracy == solved / 300
    assert s.tokens_consumed == consumed and s.tokens_allocated == caps.sum()
    assert s.unused_budget == 200_000 - caps.sum()
    assert s.abandonment_rate == np.mean(caps == 0)
