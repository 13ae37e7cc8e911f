"""`clear-llm bench --protocol online`: every query priced on arrival by the allocator's online market and
settled with what it generated. Checked against the batch protocol, the ledger's bound and the dump."""

import json
from collections import defaultdict

import numpy as np
import pytest

from clear_bench.online import StreamInputs, serve_online
from clear_core.policies import parse_policy
from clear_core.simulate import solved_mask
from clear_core.traces import load_pool, make_stream
from clear_llm.cli import main
from tests.conftest import MAIN_POOL

POLICIES = "uniform,uniform-generated,clear-cost,clear-cost-emp"


@pytest.fixture(scope="module")
def online_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    argv = ["bench", "--traces", str(MAIN_POOL), "--predictions", "oracle-noise:0.5", "--streams", "mostly-hard",
            "--budgets", "256,1024", "--policies", POLICIES, "--seeds", "0", "--queries", "200",
            "--no-figures", "--dump-allocations", "--shrink", "30"]
    assert main(argv + ["--protocol", "online", "--in-flight", "8", "--out", str(out / "online")]) == 0
    assert main(argv + ["--out", str(out / "single")]) == 0
    return out


def _told_the_truth(stream) -> StreamInputs:
    """Each query predicted at its recorded length, with a spread of 0.5 and no runaways."""
    tau = stream.tokens.astype(float)
    return StreamInputs(raw=tau, sigma=0.5, median=tau, spread=np.full(tau.size, 0.5), runaway=np.zeros(tau.size))


def _rows(path):
    return {(r["policy"], r["budget_per_query"]): r for r in json.loads((path / "results.json").read_text())}


def test_refunding_policies_never_generate_more_than_the_budget_and_uniform_is_the_batch(online_out):
    online, single = _rows(online_out / "online"), _rows(online_out / "single")
    for (policy, b), r in online.items():
        assert r["protocol"] == "online:in_flight=8"
        if policy in ("clear-cost", "clear-cost-emp"):
            # The ledger never lets reserved + spent pass the block: what was generated is within b N.
            assert r["tokens_consumed"] <= b * r["n_queries"]
        if policy in ("uniform", "uniform-generated"):  # a uniform cap is the same on arrival as in batch
            assert r["accuracy"] == single[(policy, b)]["accuracy"]
            assert r["tokens_allocated"] == single[(policy, b)]["tokens_allocated"]


def test_dumped_caps_rescore_to_the_reported_accuracy(online_out):
    problems = {p.id: p for p in load_pool(MAIN_POOL)}
    solved = defaultdict(list)
    for line in (online_out / "online" / "allocations.jsonl").read_text().splitlines():
        a = json.loads(line)
        assert a["protocol"] == "online"
        s = problems[a["problem_id"]].samples[a["sample_index"]]
        solved[(a["policy"], a["budget_per_query"])].append(a["cap"] >= s.tokens and s.correct and not s.truncated)
    for key, r in _rows(online_out / "online").items():
        assert np.mean(solved[key]) == pytest.approx(r["accuracy"])


def test_a_stream_that_runs_long_raises_the_price_for_the_rest_of_it():
    """Same predictions, true lengths twice as long: pacing on what was really generated leaves less for
    the later queries, so they get smaller caps (a batch clearing of expected tokens could not see it)."""
    problems = load_pool(MAIN_POOL)
    stream = make_stream(problems, "balanced", 300, 0)
    n = len(stream)
    inputs = _told_the_truth(stream)
    policy = parse_policy("clear-cost")
    as_predicted = serve_online(policy, inputs, stream.tokens, 512, context_limit_tokens=8192)
    longer = serve_online(policy, inputs, 2 * stream.tokens, 512, context_limit_tokens=8192)
    half = n // 2
    assert longer[half:].sum() < 0.8 * as_predicted[half:].sum()
    for caps, tokens in ((as_predicted, stream.tokens), (longer, 2 * stream.tokens)):
        assert np.minimum(caps, tokens).sum() <= 512 * n
    assert solved_mask(as_predicted, stream.tokens, stream.correct).mean() > 0.3


def test_online_needs_one_sample_per_query(tmp_path, capsys):
    rc = main(["bench", "--traces", str(MAIN_POOL), "--protocol", "best-of-k", "--policies", "uniform-generated",
               "--out", str(tmp_path)])
    assert rc == 2 and "single or online" in capsys.readouterr().err


def test_online_pacing_figure_draws_what_the_ledger_spent_with_and_without_requests_in_flight(tmp_path):
    """The spent line is the ledger's own count (never above b N, ending at what the stream generated),
    for 0 and 32 requests in flight; the text stays inside the figure."""
    import matplotlib.pyplot as plt

    from clear_bench.online_plot import online_pacing_figure
    from tests.unit.figure_checks import assert_text_inside, by_gid

    problems = load_pool(MAIN_POOL)
    stream = make_stream(problems, "balanced", 200, 1)
    n = len(stream)
    inputs = _told_the_truth(stream)
    policy = parse_policy("clear-cost")
    traces, caps = {}, {}
    for k in (0, 32):
        tr: list = []
        caps[k] = serve_online(policy, inputs, stream.tokens, 512, context_limit_tokens=8192, in_flight=k, trace=tr)
        traces[f"{k} in flight"] = tr
    fig = online_pacing_figure(traces, 512, n, "clear-cost served online")
    for k in (0, 32):
        (line,) = by_gid(fig, f"spent:{k} in flight")
        y = np.asarray(line.get_ydata()) * 1e3
        assert y.max() <= 512 * n and np.all(np.diff(y) >= 0)
        generated = np.minimum(caps[k], stream.tokens)
        # Spent after the last arrival: everything but the requests admitted among the last k arrivals,
        # still in flight then (a request ends k arrivals after its own, admitted or not in between).
        open_then = np.flatnonzero((caps[k] > 0) & (np.arange(n) >= n - k))
        assert y[-1] == pytest.approx(generated.sum() - generated[open_then].sum(), abs=1)
    assert_text_inside(fig)
    plt.close(fig)


def test_a_uniform_cap_served_with_nothing_in_flight_is_the_batch_and_in_flight_only_cuts_it():
    """Served through the ledger with each query settled before the next, the budget-filling uniform cap
    solves exactly what it solves in batch (a cut at the end of the block still covers what was generated);
    with requests in flight the pool holds their caps, so it can only solve less."""
    from clear_bench.online import best_served_uniform, serve_uniform
    from clear_core.simulate import uniform_cap_within

    problems = load_pool(MAIN_POOL)
    for stream_name, b in (("balanced", 512), ("mostly-easy", 1024)):
        stream = make_stream(problems, stream_name, 300, 2)
        n = len(stream)
        fill = uniform_cap_within(stream.tokens, b * n, 8192)
        batch = solved_mask(np.full(n, fill), stream.tokens, stream.correct).mean()
        caps0 = serve_uniform(fill, stream.tokens, b, in_flight=0)
        assert solved_mask(caps0, stream.tokens, stream.correct).mean() == batch
        assert np.minimum(caps0, stream.tokens).sum() <= b * n
        caps32 = serve_uniform(fill, stream.tokens, b, in_flight=32)
        assert solved_mask(caps32, stream.tokens, stream.correct).mean() <= batch
        assert (caps32 <= fill).all() and np.minimum(caps32, stream.tokens).sum() <= b * n
        cap, acc = best_served_uniform(stream.tokens, stream.correct, b, in_flight=32, context_limit_tokens=8192)
        assert acc >= solved_mask(caps32, stream.tokens, stream.correct).mean()
        assert acc == solved_mask(serve_uniform(cap, stream.tokens, b, in_flight=32), stream.tokens,
                                  stream.correct).mean()


def test_online_rows_with_requests_in_flight_carry_the_served_uniform_baseline(online_out):
    online = _rows(online_out / "online")
    for (policy, b), r in online.items():
        assert 0.0 <= r["uniform_served_accuracy"] <= 1.0 and r["uniform_served_cap"] >= 1
    # one baseline per (stream, seed, budget): every policy's row carries the same one
    by_budget = defaultdict(set)
    for (policy, b), r in online.items():
        by_budget[b].add((r["uniform_served_cap"], r["uniform_served_accuracy"]))
    assert all(len(v) == 1 for v in by_budget.values())
    md = (online_out / "online" / "results.md").read_text()
    assert "## `clear-cost` against uniform caps served with the same requests in flight" in md
    single = _rows(online_out / "single")
    assert all(r["uniform_served_accuracy"] is None for r in single.values())


def test_the_bench_s_smoothing_reaches_every_bin_s_histogram():
    from clear_bench.predictions import parse_predictions

    problems = load_pool(MAIN_POOL)
    stream = make_stream(problems, "balanced", 50, 0)
    cells = {}
    for width in (0.0, 0.375):
        cals = parse_predictions("oracle-noise:0.5", calibration="binned", problems=problems,
                                 smoothing=width).fold_calibrations(stream)
        cells[width] = [int((np.asarray(h.correct) + np.asarray(h.wrong) > 1e-12).sum())
                        for c in cals for h in c.histograms]
    assert all(a < b for a, b in zip(cells[0.0], cells[0.375])), cells
    assert main(["bench", "--traces", str(MAIN_POOL), "--smoothing", "-1", "--out", "unused"]) == 2
