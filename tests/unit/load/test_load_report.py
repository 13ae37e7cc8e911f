"""The load test's recorded files and its figures: status polls, 429s, shadow price and budget over time."""

import asyncio
import json
import random

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from load_tests import report
from load_tests.driver import LoadConfig, RequestRecord, run_load
from load_tests.traffic import PlannedRequest
from tests.unit.figure_checks import assert_legends_off_the_data, assert_text_inside, assert_titles_apart, by_gid

BUDGET_PER_QUERY = 200


def allocator_server(status_route: bool = True) -> tuple[FastAPI, dict]:
    """A fake CLEAR endpoint with books: every arrival credits the budget and raises the price;
    sample indices divisible by 3 are abandoned (429); the rest reserve a cap, generate half of it
    after a short wait, and are charged the cap (per_query mode)."""
    app = FastAPI()
    books = {"granted": 0, "reserved": 0, "spent": 0, "allocated": 0, "generated": 0, "price": 0.0,
             "decisions": [], "status_calls": 0}

    def price() -> float:
        return round(books["price"], 6)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    if status_route:
        @app.get("/v1/clear/status")
        async def status():
            books["status_calls"] += 1
            recent = books["decisions"][-200:]
            return {"policy": "clear", "budget_mode": "per_query", "shadow_price": price(),
                    "available_tokens": books["granted"] - books["reserved"] - books["spent"],
                    "reserved_tokens": books["reserved"], "spent_tokens": books["spent"],
                    "granted_tokens": books["granted"], "allocated_tokens_total": books["allocated"],
                    "generated_tokens_total": books["generated"],
                    "abandonment_rate": sum(recent) / len(recent) if recent else 0.0,
                    "abandonment_window_requests": 200}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        j = body["clear_sample_index"]
        books["granted"] += BUDGET_PER_QUERY
        books["price"] += 0.001
        if j % 3 == 0:
            books["decisions"].append(1)
            return JSONResponse({"error": {"type": "budget_abandoned", "shadow_price": price(),
                                           "predicted_threshold_tokens": 900.0}}, status_code=429)
        books["decisions"].append(0)
        cap = 100 + 10 * j
        books["reserved"] += cap
        books["allocated"] += cap
        at = price()

        async def events():
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}}],
                                         "clear": {"allocated_tokens": cap, "shadow_price": at}}) + "\n\n"
            await asyncio.sleep(0.003)
            books["reserved"] -= cap
            books["spent"] += cap
            books["generated"] += cap // 2
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                         "clear": {"replay": {"solved": j % 2 == 0}}}) + "\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": cap // 2}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app, books


def plan(n):
    return [PlannedRequest(i, f"p{i}", i % 9, "2+2?", "4", 100, True, "easy") for i in range(n)]


def drive(app, n=36, interval=0.002, samples=True, mode="concurrency"):
    cfg = LoadConfig(base_url="http://fake", mode=mode, concurrency=3, rate_rps=400.0, max_requests=n,
                     status_interval_s=interval)
    status = [] if samples else None
    recs = asyncio.run(run_load(cfg, plan(n), status_samples=status, transport=httpx.ASGITransport(app=app)))
    return recs, status


# -- the driver's polls ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["concurrency", "rate"])
def test_driver_polls_the_status_on_the_records_clock(mode):
    app, books = allocator_server()
    recs, status = drive(app, mode=mode)
    assert len(recs) == 36 and sum(r.status == "abandoned" for r in recs) == 12
    assert len(status) >= 2 and books["status_calls"] == len(status)
    t = [s["t_s"] for s in status]
    assert t == sorted(t) and all(s["rtt_s"] >= 0 for s in status)
    # one poll before any request was decided, one after the last ended, with the final books
    assert status[0]["granted_tokens"] < 36 * BUDGET_PER_QUERY
    assert t[-1] >= max(r.start_s + r.latency_s for r in recs)
    last = status[-1]
    assert last["granted_tokens"] == 36 * BUDGET_PER_QUERY and last["reserved_tokens"] == 0
    assert last["allocated_tokens_total"] == sum(r.allocated_tokens or 0 for r in recs)
    assert last["available_tokens"] + last["spent_tokens"] == last["granted_tokens"]


def test_driver_stops_polling_a_target_without_a_status_route():
    app, books = allocator_server(status_route=False)
    recs, status = drive(app)
    assert len(recs) == 36 and status == []


def test_driver_polls_nothing_unless_asked():
    app, books = allocator_server()
    drive(app, samples=False)
    assert books["status_calls"] == 0
    app, books = allocator_server()
    recs, status = drive(app, interval=None)
    assert books["status_calls"] == 0 and status == []


# -- the files and the entry point ---------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two targets driven through the real driver, written as the load test writes them."""
    out = tmp_path_factory.mktemp("load")
    for label in ("uniform", "clear"):
        app, _ = allocator_server()
        recs, status = drive(app, n=45)
        report.write_run(out, label, recs, status)
    return out


def test_the_files_round_trip(recorded):
    runs, statuses = report.load_results([recorded])
    assert set(runs) == {"uniform", "clear"} and set(statuses) == {"uniform", "clear"}
    rows = [json.loads(x) for x in (recorded / "clear.records.jsonl").read_text().splitlines()]
    assert [r.as_dict() for r in runs["clear"]] == rows
    assert all(isinstance(r, RequestRecord) for r in runs["clear"])
    polls = [json.loads(x) for x in (recorded / "clear.status.jsonl").read_text().splitlines()]
    assert statuses["clear"] == polls and len(polls) >= 2


def test_report_entry_point_draws_both_figures(recorded, tmp_path, capsys):
    assert report.main(["--results", str(recorded / "clear.records.jsonl"), str(recorded / "uniform.records.jsonl"),
                        "--out", str(tmp_path / "figs")]) == 0
    for name in ("over_time.png", "allocator_over_time.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 20_000
    assert "429 rate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main(["--results", str(tmp_path / "nothing-here"), "--out", str(tmp_path)])


# -- what the allocator figure draws --------------------------------------------------------

def test_allocator_figure_draws_the_recorded_prices_pool_and_books(recorded):
    runs, statuses = report.load_results([recorded])
    fig = report.allocator_figure(runs, statuses)
    for label, recs in runs.items():
        for status in ("ok", "abandoned"):
            want = sorted((r.start_s, r.shadow_price) for r in recs if r.status == status)
            assert want, f"{label} has {status} records with a price"
            (layer,) = by_gid(fig, f"price:{label}:{status}")
            assert sorted(map(tuple, layer.get_offsets().tolist())) == want
        (line,) = by_gid(fig, f"price:{label}:status")
        np.testing.assert_array_equal(line.get_xdata(), [s["t_s"] for s in statuses[label]])
        np.testing.assert_array_equal(line.get_ydata(), [s["shadow_price"] for s in statuses[label]])
        (line,) = by_gid(fig, f"pool:{label}:available_tokens")
        np.testing.assert_array_equal(line.get_ydata(), [s["available_tokens"] for s in statuses[label]])
        (line,) = by_gid(fig, f"pool:{label}:reserved_all_tokens")
        np.testing.assert_array_equal(line.get_ydata(), [s["reserved_tokens"] for s in statuses[label]])
        assert not fig.findobj(lambda a: a.get_gid() == f"pool:{label}:leased_idle_tokens")  # no leases: not drawn
        for key in ("granted_tokens", "spent_tokens", "allocated_tokens_total", "generated_tokens_total"):
            (line,) = by_gid(fig, f"books:{label}:{key}")
            np.testing.assert_array_equal(line.get_ydata(), [s[key] for s in statuses[label]])
        (line,) = by_gid(fig, f"abandon:{label}:status")
        np.testing.assert_allclose(line.get_ydata(), [100 * s["abandonment_rate"] for s in statuses[label]])
        # the 429 share per bin, recomputed from the records and the bars' own edges
        bars = by_gid(fig, f"abandon:{label}:bins")
        edges = [b.get_x() for b in bars] + [bars[-1].get_x() + bars[-1].get_width()]
        assert edges[0] <= min(r.start_s for r in recs) and edges[-1] >= max(r.start_s for r in recs)
        for k, bar in enumerate(bars):
            last = k == len(bars) - 1
            inside = [r for r in recs if edges[k] <= r.start_s and (r.start_s < edges[k + 1] or
                                                                    (last and r.start_s == edges[k + 1]))]
            share = 100 * sum(r.status == "abandoned" for r in inside) / len(inside) if inside else 0.0
            assert bar.get_height() == pytest.approx(share)
    assert_text_inside(fig)
    assert_legends_off_the_data(fig)


def test_allocator_figure_without_polls_says_so(recorded):
    runs, _ = report.load_results([recorded])
    fig = report.allocator_figure(runs, {})
    assert len(by_gid(fig, "no-status")) == 2 * len(runs)
    assert by_gid(fig, "price:clear:abandoned")  # the prices the responses carried are still there
    assert_text_inside(fig)


# -- what the clients' figure draws ---------------------------------------------------------

def test_over_time_figure_shows_the_429s(recorded):
    runs, _ = report.load_results([recorded])
    fig = report.over_time_figure(runs)
    for label, recs in runs.items():
        n429 = sum(r.status == "abandoned" for r in recs)
        assert n429 > 0
        bars = by_gid(fig, f"outcomes:{label}:abandoned")
        assert sum(b.get_height() * b.get_width() for b in bars) == pytest.approx(n429)
        every = sum(b.get_height() * b.get_width() for key, *_ in report.OUTCOMES
                    for b in fig.findobj(lambda a, k=key: a.get_gid() == f"outcomes:{label}:{k}"))
        assert every == pytest.approx(len(recs))
        (lat,) = by_gid(fig, f"latency:{label}:abandoned")
        assert len(lat.get_offsets()) == n429
        (share,) = by_gid(fig, f"rate429:{label}")
        assert share.get_ydata()[-1] == pytest.approx(100 * n429 / len(recs))
        (acc,) = by_gid(fig, f"accuracy:{label}")
        assert acc.get_ydata()[-1] == pytest.approx(100 * sum(r.solved for r in recs) / len(recs))
    assert_text_inside(fig)
    assert_legends_off_the_data(fig)


# -- a longer synthetic run, as the driver writes it, to look at ------------------------------

def synthetic_run(label: str, seconds: float, clear: bool, seed: int) -> tuple[list[dict], list[dict]]:
    """Records and polls of a ``seconds``-long open-loop run (dicts as the driver writes them)."""
    rng = random.Random(seed)
    t, i, rows = 0.0, 0, []
    while t < seconds:
        t += rng.expovariate(4.0)
        pressure = 0.5 + 0.5 * np.sin(t / seconds * 2 * np.pi)  # demand rises and falls
        price = (0.002 + 0.01 * pressure) if clear else None
        if clear and rng.random() < 0.1 + 0.5 * pressure:
            rows.append(dict(index=i, problem_id=f"p{i}", tier="hard", status="abandoned", http_status=429,
                             start_s=t, ttft_s=None, latency_s=0.02 + 0.01 * rng.random(), completion_tokens=0,
                             allocated_tokens=None, predicted_threshold_tokens=2000.0, shadow_price=price,
                             finish_reason=None, solved=False, error="budget_abandoned"))
        else:
            cap = 256 if not clear else rng.choice([64, 128, 256, 384])
            rows.append(dict(index=i, problem_id=f"p{i}", tier="easy", status="ok", http_status=200, start_s=t,
                             ttft_s=0.05, latency_s=0.5 + 3 * rng.random(), completion_tokens=cap // 2,
                             allocated_tokens=cap, predicted_threshold_tokens=300.0, shadow_price=price,
                             finish_reason="stop", solved=rng.random() < 0.6, error=None))
        i += 1
    polls, spent = [], 0
    for k in range(int(seconds) + 1):
        done = [r for r in rows if r["start_s"] + r["latency_s"] <= k]
        flying = [r for r in rows if r["start_s"] <= k < r["start_s"] + r["latency_s"] and r["status"] == "ok"]
        granted = 256 * sum(r["start_s"] <= k for r in rows)
        spent = sum(r["allocated_tokens"] or 0 for r in done)
        reserved = sum(r["allocated_tokens"] for r in flying)
        recent = [r["status"] == "abandoned" for r in rows if r["start_s"] <= k][-200:]
        polls.append({"t_s": k + 0.004, "rtt_s": 0.008, "shadow_price": 0.002 + 0.01 * (0.5 + 0.5 * np.sin(
            k / seconds * 2 * np.pi)) if clear else 0.0, "available_tokens": granted - spent - reserved,
            "reserved_tokens": reserved, "spent_tokens": spent, "granted_tokens": granted,
            "allocated_tokens_total": spent + reserved, "generated_tokens_total": sum(
                r["completion_tokens"] for r in done), "abandonment_rate": sum(recent) / len(recent) if recent else 0,
            "abandonment_window_requests": 200})
    return rows, polls


@pytest.mark.slow  # a long run's figures
def test_a_long_synthetic_run_renders_from_its_files(tmp_path):
    # long labels, as a load demo names its runs: the column titles must wrap, not run into each other
    uniform, clear_ = "uniform-balanced-256-tokens-per-query", "clear-balanced-256-tokens-per-query"
    for label, clear in ((uniform, False), (clear_, True)):
        rows, polls = synthetic_run(label, 120.0, clear, seed=1 if clear else 2)
        (tmp_path / f"{label}.records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{label}.status.jsonl").write_text("".join(json.dumps(p) + "\n" for p in polls))
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path)]) == 0
    runs, statuses = report.load_results([tmp_path])
    assert len(statuses[clear_]) == 121
    fig = report.allocator_figure(runs, statuses)
    (layer,) = by_gid(fig, f"price:{clear_}:abandoned")
    assert len(layer.get_offsets()) == sum(r.status == "abandoned" for r in runs[clear_]) > 0
    assert_text_inside(fig)
    assert_titles_apart(fig)
    assert_legends_off_the_data(fig)
    fig = report.over_time_figure(runs)
    assert_text_inside(fig)
    assert_titles_apart(fig)
    assert "429" in fig.axes[0].get_title()


def test_with_leases_the_pool_panel_counts_caps_reserved_in_leases_and_draws_the_leases():
    statuses = {"clear": [
        {"t_s": 0.0, "shadow_price": 0.0, "abandonment_rate": 0.0, "available_tokens": 100, "reserved_tokens": 0,
         "lease_reserved_tokens": 0, "leased_tokens": 0, "spent_tokens": 0, "granted_tokens": 100,
         "allocated_tokens_total": 0, "generated_tokens_total": 0},
        {"t_s": 1.0, "shadow_price": 0.001, "abandonment_rate": 0.1, "available_tokens": 40, "reserved_tokens": 0,
         "lease_reserved_tokens": 25, "leased_tokens": 50, "spent_tokens": 10, "granted_tokens": 100,
         "allocated_tokens_total": 35, "generated_tokens_total": 10},
    ]}
    fig = report.allocator_figure({"clear": []}, statuses)
    (line,) = by_gid(fig, "pool:clear:reserved_all_tokens")
    np.testing.assert_array_equal(line.get_ydata(), [0, 25])
    (line,) = by_gid(fig, "pool:clear:leased_idle_tokens")
    np.testing.assert_array_equal(line.get_ydata(), [0, 25])
