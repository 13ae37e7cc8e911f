"""Best-of-k under one budget: the protocols against a brute force, the oracle's least budget, the code pool."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from clear_core.best_of_k import make_trial_stream, minimal_budget, run_trials
from clear_core.traces import Problem, Sample, load_pool, make_stream, pool_streams
from tests.conftest import CODE_POOL, MAIN_POOL
from tests.fakes import brute


@pytest.mark.parametrize("protocol", ["parallel", "sequential"])
def test_protocols_match_a_brute_force_on_every_small_case(protocol):
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 40, size=(300, 3))
    correct = rng.random((300, 3)) < 0.4
    caps = rng.integers(0, 130, size=300)
    for limit in (None, 25):
        out = run_trials(caps, tokens, correct, protocol, context_limit_tokens=limit)
        for i in range(300):
            want = brute(int(caps[i]), tokens[i].tolist(), correct[i].tolist(), protocol, limit)
            assert (bool(out.solved[i]), int(out.generated[i]), int(out.longest[i])) == want, (i, limit)


@pytest.mark.parametrize("protocol", ["parallel", "sequential"])
def test_the_oracle_budget_is_the_least_that_solves(protocol):
    """minimal_budget against a search over every budget 0..sum of caps, on hand-made queries."""
    cases = list(itertools.product([3, 7, 12], repeat=3))
    for toks in cases:
        for ok in itertools.product([False, True], repeat=3):
            need, solvable = minimal_budget(np.array([toks]), np.array([ok]), protocol)
            hits = [c for c in range(0, 3 * 12 + 1)
                    if run_trials(np.array([c]), np.array([toks]), np.array([ok]), protocol).solved[0]]
            assert bool(solvable[0]) == bool(hits), (toks, ok)
            if hits:
                assert int(need[0]) == hits[0], (toks, ok)


def test_sequential_and_parallel_differ_where_they_should():
    # Three trajectories of 100 tokens; only the third passes. With 300 tokens in total:
    # in parallel each gets 100 and the third solves it; in sequence it also gets there (100 + 100 + 100).
    # With 240: parallel gives 80 each (nobody fits); sequential runs two failures, then 40 for the third.
    toks, ok = np.array([[100, 100, 100]]), np.array([[False, False, True]])
    assert run_trials(np.array([300]), toks, ok, "parallel").solved[0]
    assert run_trials(np.array([300]), toks, ok, "sequential").solved[0]
    assert not run_trials(np.array([240]), toks, ok, "parallel").solved[0]
    assert not run_trials(np.array([240]), toks, ok, "sequential").solved[0]
    # The first trajectory is short and passes: sequential needs 30, parallel 3 x 30 = 90 and stops nothing early.
    toks, ok = np.array([[30, 500, 500]]), np.array([[True, True, True]])
    seq = run_trials(np.array([60]), toks, ok, "sequential")
    par = run_trials(np.array([60]), toks, ok, "parallel")
    assert seq.solved[0] and seq.generated[0] == 30 and not par.solved[0] and par.generated[0] == 60
    assert minimal_budget(toks, ok, "sequential")[0][0] == 30 and minimal_budget(toks, ok, "parallel")[0][0] == 90


def test_the_code_pool_loads_with_its_own_streams_and_the_math_streams_are_unchanged():
    code = load_pool(CODE_POOL)
    assert len(code) == 589 and {p.tier for p in code} == {"humaneval", "leetcode", "codecontests"}
    assert pool_streams(code) == ["balanced", "mostly-easy", "mostly-hard"]
    hard = make_stream(code, "mostly-hard", 500, 1)
    assert Counter(hard.tiers) == {"humaneval": 50, "leetcode": 150, "codecontests": 300}
    main = load_pool(MAIN_POOL)
    assert pool_streams(main) == ["balanced", "mostly-easy", "mostly-hard", "u-shaped"]
    with pytest.raises(Exception, match="for a math pool"):
        make_stream(main, "no-such-stream", 10, 0)


def test_a_trial_stream_keeps_each_problems_first_k_samples():
    code = load_pool(CODE_POOL)
    ts = make_trial_stream(code, "balanced", 200, 0, k=5)
    by_id = {p.id: p for p in code}
    assert ts.tokens.shape == (200, 5) and len(ts) == 200
    for i, pid in enumerate(ts.stream.problem_ids):
        assert ts.tokens[i].tolist() == [s.tokens for s in by_id[pid].samples[:5]]
        assert ts.correct[i].tolist() == [s.correct for s in by_id[pid].samples[:5]]
    # 200 x 1/3 each: 66 each plus 2 by largest remainder (codecontests carries the rounding, then humaneval)
    assert Counter(ts.stream.tiers) == {"humaneval": 67, "leetcode": 66, "codecontests": 67}
    one = Problem("x/1", "humaneval", None, "p", "", (Sample(10, True, False),))
    with pytest.raises(Exception, match="fewer samples"):
        make_trial_stream([one], "balanced", 5, 0, k=2)


def test_the_math_bench_numbers_are_unchanged_by_the_strata():
    """The bench's figures on the main pool as they were before pools got strata and a stream table
    (balanced, oracle-noise:0.5, seeds 0-4): the strata must not move them."""
    from clear_bench.predictions import parse_predictions
    from clear_bench.runner import run_grid

    rows = run_grid(load_pool(MAIN_POOL), parse_predictions("oracle-noise:0.5"), streams=["balanced", "mostly-hard"],
                    budgets=[256, 1024], policies=["uniform", "clear"], seeds=range(5))
    mean = {}
    for r in rows:
        mean.setdefault((r["stream"], r["budget_per_query"], r["policy"]), []).append(r["accuracy"])
    got = {k: round(100 * float(np.mean(v)), 1) for k, v in mean.items()}
    assert got == {("balanced", 256, "uniform"): 25.6, ("balanced", 256, "clear"): 42.9,
                   ("balanced", 1024, "uniform"): 57.4, ("balanced", 1024, "clear"): 64.2,
                   ("mostly-hard", 256, "uniform"): 9.2, ("mostly-hard", 256, "clear"): 27.7,
                   ("mostly-hard", 1024, "uniform"): 34.2, ("mostly-hard", 1024, "clear"): 43.4}


def test_the_predictor_cross_validates_on_the_code_pool(tmp_path):
    from clear_core.predictions import read_predictions
    from clear_llm.cli import main

    out = tmp_path / "oof.jsonl"
    assert main(["predictor", "crossval", "--traces", str(CODE_POOL), "--folds", "3", "--model", "tfidf",
                 "--out", str(out)]) == 0
    table = read_predictions(str(out))
    assert len(table.thresholds) == 589 and all(t > 0 for t in table.thresholds.values())
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert {"humaneval", "leetcode", "codecontests"} <= set(json.dumps(metrics).replace('"', " ").split())
