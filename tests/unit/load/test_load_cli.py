"""`python -m load_tests` against a small HTTP server in a thread (no Ray): target URLs with /v1, a warning
when the server replays another pool, one-line errors for every bad target, pool, count or folder."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.requests import Request

from clear_core.traces import load_pool, pool_fingerprint
from deployments.config import AppConfig
from deployments.engines.workload import load_workload
from deployments.ingress import Ingress
from load_tests.driver import normalize_base_url
from tests.cli_support import assert_one_line_error, run_cli
from tests.conftest import MAIN_POOL, TLDR_POOL
from tests.factories import app_args
from tests.fakes import FakeAllocator, FakeEngine, FakePredictor

PROG = "python -m load_tests"


class FakeServer:
    """An OpenAI-style server that answers every chat request with 5 tokens and reports ``replay`` (or nothing)
    as the pool it replays, the way the CLEAR ingress does in GET /v1/models; it records the paths asked for."""

    def __init__(self, replay: dict | None = None, models_status: int = 200):
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, status: int, body: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.paths.append(self.path)
                model = {"id": "fake", "object": "model"}
                if replay is not None:
                    model["clear"] = {"replay": replay}
                if self.path == "/v1/models" and models_status == 200:
                    self._send(200, json.dumps({"object": "list", "data": [model]}).encode(), "application/json")
                else:
                    self._send(models_status if self.path == "/v1/models" else 404, b'{"error": {}}',
                               "application/json")

            def do_POST(self):
                outer.paths.append(self.path)
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {}}', "application/json")
                events = [
                    {"choices": [{"index": 0, "delta": {"content": "x" * 5}}], "clear": {"allocated_tokens": 64}},
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "clear": {"replay": {"solved": True}}},
                    {"choices": [], "usage": {"completion_tokens": 5}},
                ]
                body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                self._send(200, body.encode(), "text/event-stream")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        # Polled every 10 ms for shutdown (the default, 0.5 s, is what each `with` would wait on exit).
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _load(target: str, out, *extra: str, traces=MAIN_POOL):
    return run_cli("-m", "load_tests", "--target", target, "--traces", str(traces), "--queries", "3",
                   "--concurrency", "1", "--out", str(out), *extra)


# One load run stays in the fast tier; the other spellings run the same 2 s load again.
@pytest.mark.parametrize("suffix", ["/v1", pytest.param("/v1/", marks=pytest.mark.slow),
                                    pytest.param("/", marks=pytest.mark.slow)])
def test_a_target_given_with_v1_or_a_slash_is_the_same_server(tmp_path, suffix):
    with FakeServer() as server:
        proc = _load(f"fake={server.url}{suffix}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert server.paths.count("/v1/models") == 1 and server.paths.count("/v1/chat/completions") == 3
    assert not [p for p in server.paths if "/v1/v1" in p]
    records = [json.loads(line) for line in (tmp_path / "fake.records.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3


@pytest.mark.slow  # a load run that loads the main pool
def test_a_server_replaying_another_pool_gets_a_one_line_warning(tmp_path):
    other = load_workload(None).describe()  # the embedded default's synthetic workload
    with FakeServer(replay=other) as server:
        proc = _load(f"fake={server.url}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{PROG}: warning: target fake replays a synthetic workload")
    assert other["fingerprint"] in warnings[0] and str(MAIN_POOL) in warnings[0]


@pytest.mark.slow  # two load runs, each loading the main pool
def test_a_server_replaying_the_same_pool_or_saying_nothing_gets_no_warning(tmp_path):
    same = load_workload(str(MAIN_POOL)).describe()  # what a replay server on this pool reports
    for replay in (same, None):
        with FakeServer(replay=replay) as server:
            proc = _load(f"fake={server.url}", tmp_path)
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_the_ingress_reports_the_pool_it_replays_as_the_load_test_fingerprints_it():
    def models(engine: dict) -> dict:
        ing = Ingress(AppConfig.model_validate(app_args(engine=engine, predictor={"placement": "deployment"})), FakePredictor(), FakeAllocator(),
                      FakeEngine(), metrics=False)
        scope = {"type": "http", "method": "GET", "path": "/v1/models", "query_string": b"", "headers": []}
        return asyncio.run(ing.models(Request(scope)))["data"][0]

    main = models({"kind": "replay", "trace_path": str(MAIN_POOL)})["clear"]["replay"]
    tldr = models({"kind": "replay", "trace_path": str(TLDR_POOL)})["clear"]["replay"]
    synthetic = models({"kind": "replay"})["clear"]["replay"]
    assert main["fingerprint"] == pool_fingerprint(load_pool(MAIN_POOL)) and main["synthetic"] is False
    assert len({main["fingerprint"], tldr["fingerprint"], synthetic["fingerprint"]}) == 3
    assert synthetic["synthetic"] is True and str(MAIN_POOL) not in json.dumps(main)  # no server path leaks


def test_an_unreachable_target_is_one_line(tmp_path):
    with FakeServer() as server:
        url = server.url  # closed on exit: nothing listens there any more
    proc = _load(f"gone={url}/v1", tmp_path)
    line = assert_one_line_error(proc, f"{PROG}: error: target gone: cannot reach {url}/v1/models")
    assert "/v1/v1" not in line


def test_a_target_that_is_not_an_openai_server_is_one_line(tmp_path):
    with FakeServer(models_status=404) as server:
        proc = _load(f"web={server.url}", tmp_path)
    assert_one_line_error(proc, f"{PROG}: error: target web: {server.url}/v1/models answered HTTP 404")


@pytest.mark.parametrize("argv, prefix", [
    (["--queries", "0"], f"{PROG}: error: argument --queries"),
    (["--concurrency", "0"], f"{PROG}: error: argument --concurrency"),
    (["--rate", "-1"], f"{PROG}: error: argument --rate"),
    (["--target", "no-url"], f"{PROG}: error: argument --target: expected LABEL=URL"),
])
def test_bad_values_are_argparses_one_line_error(tmp_path, argv, prefix):
    proc = run_cli("-m", "load_tests", "--target", "a=http://127.0.0.1:9", "--traces", str(MAIN_POOL),
                   "--out", str(tmp_path), *argv)
    assert_one_line_error(proc, prefix, usage=True)


def test_a_missing_pool_an_unwritable_out_and_a_label_twice_are_one_line(tmp_path):
    proc = _load("a=http://127.0.0.1:9", tmp_path, traces=tmp_path / "nope.jsonl")
    assert_one_line_error(proc, f"{PROG}: error: {tmp_path / 'nope.jsonl'}: No such file or directory")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = _load("a=http://127.0.0.1:9", blocker / "out")
    assert_one_line_error(proc, f"{PROG}: error: argument --out: cannot write to")
    proc = _load("a=http://127.0.0.1:9,a=http://127.0.0.1:10", tmp_path)
    assert_one_line_error(proc, f"{PROG}: error: argument --target: a label names two targets")


def test_the_help_shows_defaults_and_the_list_syntax():
    proc = run_cli("-m", "load_tests", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "(default: 500)" in text and "(default: balanced)" in text and "comma- or space-separated" in text


@pytest.mark.parametrize("given", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                                   " http://h:8000/v1// "])
def test_normalize_base_url(given):
    assert normalize_base_url(given) == "http://h:8000"
    assert normalize_base_url("http://h:8000/clear/v1") == "http://h:8000/clear"


def test_a_bad_target_inside_another_command_line_is_one_line_too(capsys):
    """load_demo and the other scripts call run_load directly; its TargetError is a usage error for run_command."""
    from clear_core.cli_args import run_command
    from load_tests.driver import LoadConfig, run_load

    with FakeServer() as server:
        url = server.url
    rc = run_command("tool", lambda: asyncio.run(run_load(LoadConfig(base_url=url, max_requests=1), [])))
    assert rc == 2 and capsys.readouterr().err.startswith(f"tool: error: cannot reach {url}/v1/models")
