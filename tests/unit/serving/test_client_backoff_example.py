"""examples/client_backoff.py against a local HTTP server that answers with the ingress's real
refusals (the JSONResponse ``deployments.ingress._error_response`` builds for an abandonment or
an unavailable allocator), a scripted number of times before a 200. Sleep is recorded, never slept."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clear_core.online_market import Decision, DecisionReason
from deployments.errors import AllocatorUnavailableError, BadRequestError, abandonment_error
from deployments.ingress import _error_response

REPO = Path(__file__).resolve().parents[3]
OK_BODY = {"id": "chatcmpl-1", "object": "chat.completion", "model": "clear-replay",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "391"}, "finish_reason": "stop"}],
           "clear": {"allocated_tokens": 300}}


def _load_example():
    spec = importlib.util.spec_from_file_location("clear_client_backoff_example", REPO / "examples" / "client_backoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the example's dataclass needs its module registered
    spec.loader.exec_module(module)
    return module


client = _load_example()


def _abandoned(reason: DecisionReason, retry_after_s: float, should_retry: bool):
    decision = Decision(reason=reason, cap_tokens=0, market_cap_tokens=0, shadow_price=0.02, threshold_tokens=900.0,
                        budget_per_query_tokens=128.0, retry_after_s=retry_after_s, should_retry=should_retry)
    return _error_response(abandonment_error(decision))


def pool_empty(retry_after_s: float = 2.2):
    return _abandoned(DecisionReason.POOL_EMPTY, retry_after_s, should_retry=True)


def insolvent():
    return _abandoned(DecisionReason.INSOLVENT, 40.0, should_retry=False)


def unavailable():
    return _error_response(AllocatorUnavailableError("the allocator is unavailable (restarting); retry shortly"))


def ok():
    return (200, {"Content-Type": "application/json"}, json.dumps(OK_BODY).encode())


def _wire(resp):
    """A starlette response (or an (status, headers, body) tuple) as what goes on the wire."""
    if isinstance(resp, tuple):
        return resp
    return resp.status_code, dict(resp.headers), bytes(resp.body)


class Server:
    """Answers POSTs with ``script`` in order (the last one repeats) and records each request."""

    def __init__(self, script):
        self.script = [_wire(r) for r in script]
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status, headers, payload = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # Polled every 10 ms for shutdown (the default, 0.5 s, is what each `with` would wait on exit).
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _call(url, policy=None, rand=0.0):
    waits: list[float] = []
    kwargs = {} if policy is None else {"policy": policy}
    try:
        answer = client.chat_completion(url, [{"role": "user", "content": "What is 17 * 23?"}], sleep=waits.append,
                                        rand=lambda: rand, max_tokens=300, **kwargs)
    except client.ClearRequestError as exc:
        return exc, waits
    return answer, waits


def test_pool_empty_is_retried_after_retry_after_then_succeeds():
    refusal = pool_empty(retry_after_s=2.2)
    asked = float(refusal.headers["Retry-After"])
    assert asked == 3.0 and refusal.status_code == 429  # the ingress rounds 2.2 s up to whole seconds
    with Server([refusal, pool_empty(2.2), ok()]) as srv:
        answer, waits = _call(srv.url)
    assert answer["choices"][0]["message"]["content"] == "391"
    assert len(srv.requests) == 3
    assert waits == [asked, asked]  # the default backoff (0.25 s, 0.5 s) is shorter than what the server asked
    assert {r["path"] for r in srv.requests} == {"/v1/chat/completions"}
    keys = {r["headers"]["Idempotency-Key"] for r in srv.requests}
    assert len(keys) == 1 and keys != {""}  # one arrival for the market, however many attempts
    assert all(r["body"] == srv.requests[0]["body"] for r in srv.requests)


def test_an_insolvent_request_is_not_retried():
    with Server([insolvent(), ok()]) as srv:
        exc, waits = _call(srv.url)
    assert isinstance(exc, client.ClearRequestError)
    assert (len(srv.requests), waits) == (1, [])
    assert (exc.status, exc.error_type, exc.attempts) == (429, "budget_abandoned", 1)
    assert "\n" not in str(exc) and "not to retry" in str(exc)


def test_the_body_decides_when_the_header_is_missing():
    no_header = _wire(insolvent())
    status, headers, body = no_header
    headers = {k: v for k, v in headers.items() if k.lower() != "x-should-retry"}
    assert json.loads(body)["error"]["should_retry"] is False
    with Server([(status, headers, body), ok()]) as srv:
        exc, waits = _call(srv.url)
    assert isinstance(exc, client.ClearRequestError) and len(srv.requests) == 1 and waits == []


def test_attempts_are_bounded():
    policy = client.RetryPolicy(max_attempts=4)
    with Server([pool_empty(1.0)]) as srv:
        exc, waits = _call(srv.url, policy)
    assert isinstance(exc, client.ClearRequestError) and exc.attempts == 4
    assert len(srv.requests) == 4 and len(waits) == 3
    assert "out of attempts" in str(exc) and exc.error_type == "budget_pool_empty"


@pytest.mark.parametrize(("rand", "expected"), [(1.0, [1.0, 2.0, 4.0, 5.0]), (0.0, [1.0, 1.0, 2.0, 2.5])])
def test_backoff_doubles_with_jitter_and_never_undercuts_retry_after(rand, expected):
    """503 allocator_unavailable says Retry-After 1: base 1 s doubling, capped at 5 s, times U(0.5, 1)."""
    assert unavailable().headers["Retry-After"] == "1" and unavailable().headers["x-should-retry"] == "true"
    policy = client.RetryPolicy(max_attempts=6, base_delay_s=1.0, max_delay_s=5.0)
    with Server([unavailable()] * 4 + [ok()]) as srv:
        answer, waits = _call(srv.url, policy, rand=rand)
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert len(srv.requests) == 5 and waits == expected


def test_a_wait_longer_than_the_client_accepts_ends_the_request():
    policy = client.RetryPolicy(give_up_after_s=60.0)
    with Server([pool_empty(retry_after_s=120.0), ok()]) as srv:
        exc, waits = _call(srv.url, policy)
    assert isinstance(exc, client.ClearRequestError) and waits == [] and len(srv.requests) == 1
    assert "120 s" in str(exc)


def test_a_bad_request_is_not_retried():
    with Server([_error_response(BadRequestError("'messages' is required", param="messages")), ok()]) as srv:
        exc, waits = _call(srv.url)
    assert (exc.status, exc.error_type, len(srv.requests), waits) == (400, "invalid_request_error", 1, [])


def test_the_command_line_prints_the_answer(capsys, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(client.time, "sleep", waits.append)  # main() sleeps with time.sleep
    with Server([pool_empty(1.0), ok()]) as srv:
        rc = client.main(["--url", srv.url, "--max-attempts", "2"])
    assert rc == 0 and len(srv.requests) == 2 and waits == [1.0]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "391" and json.loads(out[1])["finish_reason"] == "stop"
