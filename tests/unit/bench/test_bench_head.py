"""`clear-llm bench --predictions head` (the shipped ridge head on cached encoder features), `--warmup-queries`
(a warm-up from one half of the pool, the scored stream from the other) and `--learn`.

The MiniLM encoder costs ~0.1 s per prompt on a CPU, so every test here reads one small pool (the first 16
problems of each of the code pool's three datasets) whose features are encoded once, into one cache folder
shared by the whole module.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from clear_bench.predictions import parse_predictions
from clear_core.errors import InvalidInputError
from clear_core.length_model import MAX_THRESHOLD_TOKENS, MIN_THRESHOLD_TOKENS
from clear_core.traces import Stream, load_pool, make_stream, split_halves
from clear_llm.cli import main
from tests.conftest import CODE_POOL

PER_DATASET = 16
DATASETS = ("humaneval", "leetcode", "codecontests")
WARMUP, QUERIES = 60, 30


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(pool path, problems, features cache dir): the first PER_DATASET problems of each dataset, verbatim."""
    if not CODE_POOL.is_file():
        raise FileNotFoundError(f"the shared code pool is missing: {CODE_POOL}")
    root = tmp_path_factory.mktemp("head-pool")
    kept, seen = [], Counter()
    for line in CODE_POOL.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        ds = json.loads(line)["dataset"]
        if seen[ds] < PER_DATASET:
            seen[ds] += 1
            kept.append(line)
    assert all(seen[d] == PER_DATASET for d in DATASETS), seen
    pool = root / "code-small.jsonl"
    pool.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return pool, load_pool(pool), root / "features"


@pytest.fixture(scope="module")
def head_predictions(small):
    """The bench's head predictions of the small pool (this encodes the pool, once, into the cache)."""
    pool, problems, cache = small
    return parse_predictions("head", calibration=None, problems=problems, pool_path=pool, features_cache=cache)


def _whole_pool_stream(problems) -> Stream:
    """One query per problem of the pool (its first sample), in pool order."""
    return Stream(
        name="balanced", seed=0, problem_ids=tuple(p.id for p in problems), prompts=tuple(p.problem for p in problems),
        sample_index=np.zeros(len(problems), dtype=np.int64),
        tokens=np.array([p.samples[0].tokens for p in problems], dtype=np.int64),
        correct=np.array([p.samples[0].correct for p in problems], dtype=bool),
        tiers=tuple(p.tier for p in problems), datasets=tuple(p.dataset for p in problems),
    )


# -- head predictions: the deployment's, from a cache ---------------------------------------------------------


def test_head_predictions_are_the_deployments(small, head_predictions):
    """What a bench query is told is what the deployment's MiniLMRidgePredictor tells a request of the same text."""
    from clear_predictor.head_predictor import HeadPredictor

    _, pool_problems, _ = small
    pred = head_predictions
    assert pred.kind == "head" and pred.calibration == "head" and pred.as_served
    assert set(pred.table) == {p.id for p in pool_problems}
    problems = pool_problems[::2]  # every dataset, half the encoding time
    stream = _whole_pool_stream(problems)
    raw = pred.raw_thresholds(stream)
    median, sigma, runaway = pred.distribution(stream)
    assert np.array_equal(pred.thresholds(stream), raw)

    hp_median, hp_sigma, hp_runaway, hp_raw = HeadPredictor().predict_with_raw([p.problem for p in problems])
    # deployments/predictor_backends.py MiniLMRidgePredictor.predict clips both to [16, 8192]
    hp_median = np.clip(hp_median, MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS)
    hp_raw = np.clip(hp_raw, MIN_THRESHOLD_TOKENS, MAX_THRESHOLD_TOKENS)
    np.testing.assert_allclose(np.log(raw), np.log(hp_raw), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.log(median), np.log(hp_median), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.broadcast_to(sigma, hp_sigma.shape), hp_sigma, atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.broadcast_to(runaway, hp_runaway.shape), hp_runaway, atol=1e-3, rtol=0)
    # the predictions are not degenerate: they differ between problems and datasets
    assert np.unique(np.round(np.log(raw), 3)).size > len(problems) // 2
    # the one spread is the median of the calibrated spreads
    assert pred.sigma == pytest.approx(float(np.median(hp_sigma)), abs=1e-6)


def test_the_features_cache_is_read_without_an_encoder(small, head_predictions, monkeypatch):
    import clear_predictor.features as features

    pool, problems, cache = small
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and pool.stem in files[0].name, files

    class NoEncoder:
        def __init__(self, *a, **kw):
            raise AssertionError("the features cache was not used: an encoder was constructed")

    monkeypatch.setattr(features, "FrozenEncoder", NoEncoder)
    again = parse_predictions("head", calibration=None, problems=problems, pool_path=pool, features_cache=cache)
    assert again.table == head_predictions.table
    assert again.features.keys() == head_predictions.features.keys()
    for pid, row in head_predictions.features.items():
        assert np.array_equal(again.features[pid], row)
    stream = make_stream(problems, "mostly-hard", 40, 3)
    for a, b in zip(again.distribution(stream), head_predictions.distribution(stream)):
        assert np.array_equal(a, b)
    # head:PATH with a copy of the shipped head: the same encoder, so the same cache and the same predictions
    from clear_predictor.head import load_head

    copy = pool.parent / "head-copy.json"
    copy.write_text(json.dumps(load_head(None).document))
    by_path = parse_predictions(f"head:{copy}", calibration=None, problems=problems, pool_path=pool,
                                features_cache=cache)
    assert by_path.kind == "head" and by_path.head.source == str(copy)
    assert by_path.table == head_predictions.table


def test_a_changed_pool_is_not_read_from_the_cache(small, head_predictions, tmp_path, monkeypatch):
    """The cache is keyed by the pool file's content: other problems under the same file name encode again."""
    import clear_predictor.features as features

    pool, problems, cache = small
    other = tmp_path / pool.name
    lines = pool.read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # one problem fewer

    class NoEncoder:
        def __init__(self, *a, **kw):
            raise RuntimeError("encoder constructed")

    monkeypatch.setattr(features, "FrozenEncoder", NoEncoder)
    with pytest.raises(RuntimeError, match="encoder constructed"):
        parse_predictions("head", calibration=None, problems=load_pool(other), pool_path=other, features_cache=cache)


def test_head_calibration_choices(small, head_predictions):
    pool, problems, cache = small
    kw = dict(problems=problems, pool_path=pool, features_cache=cache)
    binned = parse_predictions("head", calibration="binned", **kw)
    assert binned.kind == "head" and binned.calibration == "binned" and binned.calibration_set is not None
    assert binned.table == head_predictions.table  # the same raw predictions, calibrated on the pool instead
    stream = make_stream(problems, "balanced", 30, 0)
    median, _, _ = binned.distribution(stream)
    assert median.shape == (30,) and np.all(np.isfinite(median)) and np.all(median > 0)
    for refused in ("global", "none"):
        with pytest.raises(InvalidInputError, match="global and none do not apply"):
            parse_predictions("head", calibration=refused, **kw)
    with pytest.raises(InvalidInputError, match="head:PATH"):
        parse_predictions("head:", calibration=None, **kw)
    with pytest.raises(InvalidInputError, match="needs the trace pool"):
        parse_predictions("head", calibration=None, problems=problems, pool_path=None, features_cache=cache)


# -- split_halves ---------------------------------------------------------------------------------------------


def test_split_halves_is_a_seeded_deterministic_partition(small):
    _, problems, _ = small
    first, second = split_halves(problems, 0)
    assert len(first) == len(problems) // 2 and len(second) == len(problems) - len(problems) // 2
    ids1, ids2 = [p.id for p in first], [p.id for p in second]
    assert not set(ids1) & set(ids2)
    assert sorted(ids1 + ids2) == sorted(p.id for p in problems)
    again = split_halves(list(reversed(problems)), 0)  # the order of the pool does not matter
    assert [p.id for p in again[0]] == ids1 and [p.id for p in again[1]] == ids2
    assert {p.id for p in split_halves(problems, 1)[0]} != set(ids1)
    odd = problems[:7]
    a, b = split_halves(odd, 5)
    assert len(a) == 3 and len(b) == 4
    # each dataset lands in both halves of this pool (the streams of the code family can be drawn from each)
    for half in (first, second):
        assert {p.dataset for p in half} == set(DATASETS)


# -- the command line -----------------------------------------------------------------------------------------


def _bench(small, out, *argv):
    pool, _, cache = small
    return main(["bench", "--traces", str(pool), "--features-cache", str(cache), "--out", str(out),
                 "--budgets", "256", "--seeds", "0", "--streams", "balanced", "--no-figures", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--predictions", "head", "--calibration", "global"], "global and none do not apply"),
    (["--predictions", "head", "--calibration", "none"], "global and none do not apply"),
    (["--predictions", "head", "--learn"], "argument --learn: needs --warmup-queries"),
    (["--predictions", "oracle-noise:0.5", "--warmup-queries", "10", "--learn"],
     "argument --learn: needs --predictions head"),
    (["--predictions", "oracle-noise:0.5", "--warmup-queries", "10", "--protocol", "single"],
     "argument --warmup-queries: a warm-up is served online"),
    (["--predictions", "head", "--warmup-queries", "10", "--protocol", "best-of-k"],
     "argument --warmup-queries: a warm-up is served online"),
])
def test_refusals_are_one_line(small, head_predictions, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert _bench(small, out, "--policies", "uniform", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clear-llm: error:") and message in err[0], err
    assert not (out / "results.json").exists()


@pytest.fixture(scope="module")
def warm_runs(small, head_predictions, tmp_path_factory):
    """The same warm-up bench with and without --learn (head predictions, one stream, seed, budget)."""
    root = tmp_path_factory.mktemp("warm")
    argv = ["--predictions", "head", "--warmup-queries", str(WARMUP), "--queries", str(QUERIES),
            "--policies", "uniform,clear-cost-emp", "--dump-allocations"]
    assert _bench(small, root / "frozen", *argv) == 0
    assert _bench(small, root / "learn", *argv, "--learn", "--refit-every", "10") == 0
    return root


def _results(path):
    return {r["policy"]: r for r in json.loads((path / "results.json").read_text())}


def _dump(path):
    return [json.loads(line) for line in (path / "allocations.jsonl").read_text().splitlines()]


def test_warmup_rows_carry_the_warmup(warm_runs):
    frozen, learn = _results(warm_runs / "frozen"), _results(warm_runs / "learn")
    assert set(frozen) == set(learn) == {"uniform", "clear-cost-emp"}
    for rows, learned in ((frozen, False), (learn, True)):
        for policy, r in rows.items():
            assert r["learn"] is learned and r["warmup_queries"] == WARMUP
            assert r["protocol"] == "online"  # the default protocol with a warm-up
            assert r["predictions"] == "head" and r["calibration"] == "head"
            assert r["n_queries"] == QUERIES  # only the scored stream is scored
            curve = r["warmup_curve"]  # both are servable
            assert [p["arrivals"] for p in curve] == [WARMUP]  # one point per 250 arrivals
            assert set(curve[0]) == {"arrivals", "accuracy", "calibration_error"}
            assert 0.0 <= curve[0]["accuracy"] <= 100.0 and np.isfinite(curve[0]["calibration_error"])
            if learned:
                assert r["warmup_probes"] >= 0 and r["warmup_probe_generated_tokens"] >= 0
            else:  # nothing is explored without learning
                assert r.get("warmup_probes", 0) == 0 and r.get("warmup_probe_generated_tokens", 0) == 0
    md = (warm_runs / "learn" / "results.md").read_text()
    assert f"after {WARMUP} warm-up arrivals the length model learned from" in md


def test_only_learning_rows_carry_warmup_probes(warm_runs):
    """warmup_probes (what exploring cost) belongs to rows that learned (--learn); the others explore nothing."""
    frozen, learn = _results(warm_runs / "frozen"), _results(warm_runs / "learn")
    assert all("warmup_probes" in r for r in learn.values())
    assert not any("warmup_probes" in r for r in frozen.values())


def test_learning_leaves_the_scored_stream_and_uniform_alone(warm_runs):
    frozen, learn = _results(warm_runs / "frozen"), _results(warm_runs / "learn")
    skip = {"learn", "warmup_curve", "warmup_probes", "warmup_probe_generated_tokens"}
    u0 = {k: v for k, v in frozen["uniform"].items() if k not in skip}
    u1 = {k: v for k, v in learn["uniform"].items() if k not in skip}
    assert u0 == u1
    # uniform's warm-up is served the same caps: only what it was told (the calibration error) may move
    assert frozen["uniform"]["warmup_curve"][0]["accuracy"] == learn["uniform"]["warmup_curve"][0]["accuracy"]
    d0, d1 = _dump(warm_runs / "frozen"), _dump(warm_runs / "learn")
    key = lambda a: (a["policy"], a["problem_id"], a["sample_index"])  # noqa: E731
    assert [key(a) for a in d0] == [key(a) for a in d1]  # the same scored stream, query for query
    assert [a["cap"] for a in d0 if a["policy"] == "uniform"] == [a["cap"] for a in d1 if a["policy"] == "uniform"]


def test_the_scored_stream_is_drawn_from_the_second_half(small, warm_runs):
    _, problems, _ = small
    first, second = split_halves(problems, 0)
    second_ids = {p.id for p in second}
    for run in ("frozen", "learn"):
        dump = _dump(warm_runs / run)
        assert len(dump) == 2 * QUERIES
        assert {a["protocol"] for a in dump} == {"online"}
        used = {a["problem_id"] for a in dump}
        assert used <= second_ids, used - second_ids
        assert {a["seed"] for a in dump} == {0}
    # the stream is the one make_stream draws from that half with the seed (its mix: balanced)
    stream = make_stream(second, "balanced", QUERIES, 0)
    got = [(a["problem_id"], a["sample_index"]) for a in _dump(warm_runs / "frozen") if a["policy"] == "uniform"]
    assert got == list(zip(stream.problem_ids, stream.sample_index.tolist()))


# -- a predictions file named head --------------------------------------------------------------------------


def test_a_file_named_head_is_given_as_dot_slash_head(small, head_predictions, tmp_path, monkeypatch, capsys):
    pool, problems, cache = small
    monkeypatch.chdir(tmp_path)
    lengths = {p.id: float(100 + 10 * i) for i, p in enumerate(problems)}
    (tmp_path / "head").write_text("".join(json.dumps({"id": pid, "threshold_tokens": t}) + "\n"
                                           for pid, t in lengths.items()))
    pred = parse_predictions("./head", calibration="none", problems=problems, pool_path=pool, features_cache=cache)
    assert pred.kind == "file" and pred.table == lengths
    # `head` is still the shipped head, whatever the cwd holds
    shipped = parse_predictions("head", calibration=None, problems=problems, pool_path=pool, features_cache=cache)
    assert shipped.kind == "head" and shipped.table == head_predictions.table

    out = tmp_path / "out"
    rc = main(["bench", "--traces", str(pool), "--predictions", "./head", "--calibration", "none", "--out", str(out),
               "--budgets", "256", "--seeds", "0", "--streams", "balanced", "--queries", "20",
               "--policies", "uniform,clear", "--no-figures", "--dump-allocations"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    assert {r["predictions"] for r in rows} == {"./head"}
    assert {r["calibration"] for r in rows} == {"none"}
    assert {r["warmup_queries"] for r in rows} == {0} and {r["learn"] for r in rows} == {False}
    assert all("warmup_curve" not in r for r in rows)
    # a warm-up with file predictions is served too (nothing learned)
    rc = main(["bench", "--traces", str(pool), "--predictions", "./head", "--out", str(tmp_path / "warm"),
               "--budgets", "256", "--seeds", "0", "--streams", "mostly-hard", "--queries", "20",
               "--warmup-queries", "20", "--policies", "uniform,clear-cost", "--no-figures"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "warm" / "results.json").read_text())
    assert {r["warmup_queries"] for r in rows} == {20} and {r["protocol"] for r in rows} == {"online"}
    assert all([p["arrivals"] for p in r["warmup_curve"]] == [20] for r in rows)
