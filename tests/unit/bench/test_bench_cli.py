"""`clear-llm bench` end to end on the shared pool, re-scored independently."""

import json
from collections import defaultdict

import numpy as np
import pytest

from clear_bench.predictions import parse_predictions
from clear_bench.report import gap_closed
from clear_core.errors import InvalidInputError
from clear_llm.cli import main
from tests.conftest import MAIN_POOL


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main([
        "bench", "--traces", str(MAIN_POOL), "--predictions", "oracle-noise:0.5", "--streams", "balanced,u-shaped",
        "--budgets", "256,2048", "--policies", "uniform,clear,clear-paper,oracle", "--seeds", "0,1",
        "--out", str(out), "--dump-allocations",
    ])
    assert rc == 0
    return out


def test_results_rows_and_files(bench_out):
    rows = json.loads((bench_out / "results.json").read_text())
    assert len(rows) == 2 * 2 * 4 * 2
    required = {"stream", "budget_per_query", "policy", "seed", "accuracy", "tokens_allocated",
                "tokens_consumed", "abandonment_rate", "shadow_price"}
    assert required <= set(rows[0])
    for r in rows:
        assert r["tokens_allocated"] <= r["budget_per_query"] * r["n_queries"]
        assert r["tokens_consumed"] <= r["tokens_allocated"]
    md = (bench_out / "results.md").read_text()
    assert "## balanced" in md and "gap closed" in md
    for png in ("phase_transition", "allocation_scatter", "noise_robustness", "beta_sensitivity", "alpha_invariance"):
        assert (bench_out / f"{png}.png").stat().st_size > 10_000


def test_allocations_rescore_to_the_reported_accuracy(bench_out):
    """Anyone can re-score the dumped caps against the pool: solved iff cap >= tokens and correct."""
    pool = {}
    for line in MAIN_POOL.read_text().splitlines():
        obj = json.loads(line)
        pool[obj["id"]] = obj["samples"]
    solved = defaultdict(int)
    count = defaultdict(int)
    with (bench_out / "allocations.jsonl").open() as fh:
        for line in fh:
            a = json.loads(line)
            key = (a["stream"], a["budget_per_query"], a["policy"], a["seed"])
            sample = pool[a["problem_id"]][a["sample_index"]]
            solved[key] += int(a["cap"] > 0 and a["cap"] >= sample["tokens"] and sample["correct"])
            count[key] += 1
    rows = json.loads((bench_out / "results.json").read_text())
    for r in rows:
        key = (r["stream"], r["budget_per_query"], r["policy"], r["seed"])
        assert count[key] == 500
        assert solved[key] / 500 == pytest.approx(r["accuracy"])


def test_headline_claims(bench_out):
    """clear is never 2 points below uniform; the paper's rule falls far below at 2048 (its failure mode)."""
    rows = json.loads((bench_out / "results.json").read_text())
    acc = defaultdict(list)
    for r in rows:
        acc[(r["stream"], r["budget_per_query"], r["policy"])].append(r["accuracy"])
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    for stream in ("balanced", "u-shaped"):
        for b in (256, 2048):
            assert mean[(stream, b, "clear")] >= mean[(stream, b, "uniform")] - 0.02
            assert mean[(stream, b, "oracle")] >= mean[(stream, b, "clear")]
        assert mean[(stream, 2048, "clear-paper")] < mean[(stream, 2048, "uniform")] - 0.05
    assert mean[("balanced", 256, "clear")] >= 1.5 * mean[("balanced", 256, "uniform")]


def test_gap_closed():
    assert gap_closed(0.5, 0.25, 0.75) == 0.5
    assert gap_closed(0.3, 0.3, 0.3) is None


def test_prediction_specs(tmp_path):
    assert parse_predictions("oracle").sigma == 0.0
    assert parse_predictions("oracle-noise:0.25").sigma == 0.25
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "threshold_tokens": 120.5, "log_sigma": 0.4}\n{"id": "b", "threshold_tokens": 30}\n')
    p = parse_predictions(str(f))
    assert p.table == {"a": 120.5, "b": 30.0} and p.sigma == 0.4
    with pytest.raises(InvalidInputError, match="oracle-noise"):
        parse_predictions("oracle-noise:abc")
    f.write_text('{"id": "a", "threshold_tokens": -1}\n')
    with pytest.raises(InvalidInputError, match="threshold_tokens"):
        parse_predictions(str(f))


def test_bad_cli_input_fails_cleanly(tmp_path, capsys):
    rc = main(["bench", "--traces", str(MAIN_POOL), "--policies", "uniform,bogus", "--out", str(tmp_path)])
    assert rc == 2 and "bogus" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["best-of-k", "sequential"])
def test_best_of_k_bench_rescores_from_the_dumped_allocations(tmp_path, protocol):
    """`--protocol best-of-k | sequential` on the code pool; the dumped total caps, re-scored here with a
    slow per-query loop over the pool's first k samples, give the reported accuracy and generated tokens."""
    from tests.conftest import CODE_POOL
    from tests.fakes import brute

    k = 3
    rc = main(["bench", "--traces", str(CODE_POOL), "--protocol", protocol, "--k", str(k), "--streams", "balanced",
               "--budgets", "256,1024", "--policies", "uniform,clear,oracle", "--seeds", "0", "--queries", "120",
               "--out", str(tmp_path), "--dump-allocations", "--no-figures"])
    assert rc == 0
    pool = {json.loads(line)["id"]: json.loads(line)["samples"] for line in CODE_POOL.read_text().splitlines()}
    spend = "parallel" if protocol == "best-of-k" else "sequential"
    solved, generated = defaultdict(int), defaultdict(int)
    for line in (tmp_path / "allocations.jsonl").read_text().splitlines():
        a = json.loads(line)
        assert (a["protocol"], a["k"]) == (protocol, k)
        samples = pool[a["problem_id"]][:k]
        ok, gen, _ = brute(a["cap"], [s["tokens"] for s in samples], [s["correct"] for s in samples], spend, 8192)
        key = (a["budget_per_query"], a["policy"])
        solved[key] += ok
        generated[key] += gen
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 6
    for r in rows:
        key = (r["budget_per_query"], r["policy"])
        assert r["protocol"] == f"{protocol}:{k}"
        assert r["solved"] == solved[key] and r["tokens_consumed"] == generated[key]
        assert r["tokens_allocated"] <= r["budget_per_query"] * 120
    by = {(r["budget_per_query"], r["policy"]): r["accuracy"] for r in rows}
    for b in (256, 1024):  # the oracle spends each query's least solving budget: nobody beats it
        assert by[(b, "oracle")] >= max(by[(b, "uniform")], by[(b, "clear")])


def test_cost_baselines_in_the_rows_and_the_report(tmp_path):
    """uniform-generated fills b generated tokens per query; the matched uniform generates what the policy did."""
    rc = main(["bench", "--traces", str(MAIN_POOL), "--streams", "balanced", "--budgets", "256,2048",
               "--policies", "uniform,uniform-generated,clear,oracle", "--seeds", "0,1", "--out", str(tmp_path),
               "--no-figures"])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    by = {(r["budget_per_query"], r["policy"], r["seed"]): r for r in rows}
    for (b, policy, seed), r in by.items():
        budget = b * r["n_queries"]
        assert r["generated_vs_budget"] == pytest.approx(r["tokens_consumed"] / budget)
        if policy == "uniform":
            # matching its own consumption cannot change which queries a uniform cap solves
            assert r["uniform_matched_accuracy"] == pytest.approx(r["accuracy"])
        if policy == "uniform-generated":
            assert r["tokens_consumed"] <= budget
            u = by[(b, "uniform", seed)]
            assert r["accuracy"] >= u["accuracy"] and r["tokens_consumed"] >= u["tokens_consumed"]
    md = (tmp_path / "results.md").read_text()
    assert "against uniform baselines on cost" in md and "uniform-generated" in md
