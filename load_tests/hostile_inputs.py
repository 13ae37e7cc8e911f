"""Hostile inputs: a table of malformed, out-of-range and unsupported requests, each with the
OpenAI-style 4xx a server must answer, and a runner that sends them to a live endpoint and checks
that none of them touches the budget (``/v1/clear/status`` before and after).

``python -m load_tests.hostile_inputs --url http://127.0.0.1:8000 [--api-key KEY]`` prints one
line per case and the totals. The unit tests send the same table through the ingress with fake
handles, and the cluster tests through Ray Serve's proxy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import httpx

from clear_core.cli_args import HelpFormatter
from load_tests.driver import normalize_base_url

MODEL = "clear-replay"
USER = [{"role": "user", "content": "What is 2+2?"}]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # chat | completion
    raw: bytes  # the body as sent
    headers: dict | None  # extra headers (None values remove a header: "authorization": None)
    status: int  # the right answer
    error_type: str

    def __post_init__(self):
        object.__setattr__(self, "headers", dict(self.headers or {}))


def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, **fields}).encode()


def completion(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "What is 2+2?", **fields}).encode()


def deep(n: int):
    v = "x"
    for _ in range(n):
        v = [v]
    return v


BAD_INPUTS = [Case(*c) for c in [
    ("not json", "chat", b"{not json", None, 400, "invalid_request_error"),
    ("empty body", "chat", b"", None, 400, "invalid_request_error"),
    ("json array", "chat", b"[1, 2]", None, 400, "invalid_request_error"),
    ("json string", "chat", b'"hello"', None, 400, "invalid_request_error"),
    ("invalid utf-8", "chat", b'{"model": "\xff\xfe"}', None, 400, "invalid_request_error"),
    ("lone surrogate", "chat", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "\ud800 hi"}]}).encode(),
     None, 400, "invalid_request_error"),
    ("nested 10k deep", "chat", json.dumps({"model": MODEL, "messages": USER, "user": deep(5)}).replace('"x"', "[" * 10000 + "]" * 10000).encode(),
     None, 400, "invalid_request_error"),
    ("nested 40 deep", "chat", json.dumps({"model": MODEL, "messages": USER, "stop": deep(40)}).encode(), None, 400,
     "invalid_request_error"),
    ("text/plain", "chat", body(), {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ("form", "chat", body(), {"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ("no model", "chat", json.dumps({"messages": USER}).encode(), None, 400, "invalid_request_error"),
    ("model not a string", "chat", body(model=7), None, 400, "invalid_request_error"),
    ("other model", "chat", body(model="gpt-4"), None, 404, "model_not_found"),
    ("no messages", "chat", json.dumps({"model": MODEL}).encode(), None, 400, "invalid_request_error"),
    ("empty messages", "chat", body(messages=[]), None, 400, "invalid_request_error"),
    ("messages not a list", "chat", body(messages="hi"), None, 400, "invalid_request_error"),
    ("message without role", "chat", body(messages=[{"content": "hi"}]), None, 400, "invalid_request_error"),
    ("unknown role beside a user", "chat", body(messages=[{"role": "wizard", "content": "x"}, *USER]), None, 400,
     "invalid_request_error"),
    ("tool role", "chat", body(messages=[*USER, {"role": "tool", "content": "x", "tool_call_id": "1"}]), None, 400,
     "invalid_request_error"),
    ("message extra field", "chat", body(messages=[{"role": "user", "content": "x", "tool_calls": []}]), None, 400,
     "invalid_request_error"),
    ("no user message", "chat", body(messages=[{"role": "system", "content": "x"}]), None, 400, "invalid_request_error"),
    ("blank user message", "chat", body(messages=[{"role": "user", "content": "   "}]), None, 400, "invalid_request_error"),
    ("image part", "chat", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     None, 400, "invalid_request_error"),
    ("content a number", "chat", body(messages=[{"role": "user", "content": 5}]), None, 400, "invalid_request_error"),
    ("max_tokens 0", "chat", body(max_tokens=0), None, 400, "invalid_request_error"),
    ("max_tokens negative", "chat", body(max_tokens=-5), None, 400, "invalid_request_error"),
    ("max_tokens string", "chat", body(max_tokens="10"), None, 400, "invalid_request_error"),
    ("max_tokens bool", "chat", body(max_tokens=True), None, 400, "invalid_request_error"),
    ("max_tokens 1.5", "chat", body(max_tokens=1.5), None, 400, "invalid_request_error"),
    ("max_tokens beyond context", "chat", body(max_tokens=10**9), None, 400, "invalid_request_error"),
    ("n=2", "chat", body(n=2), None, 400, "invalid_request_error"),
    ("stream a string", "chat", body(stream="yes"), None, 400, "invalid_request_error"),
    ("stream_options without stream", "chat", body(stream_options={"include_usage": True}), None, 400,
     "invalid_request_error"),
    ("stream_options unknown key", "chat", body(stream=True, stream_options={"x": 1}), None, 400, "invalid_request_error"),
    ("temperature 2.5", "chat", body(temperature=2.5), None, 400, "invalid_request_error"),
    ("temperature -1", "chat", body(temperature=-1), None, 400, "invalid_request_error"),
    ("temperature string", "chat", body(temperature="hot"), None, 400, "invalid_request_error"),
    ("top_p 1.5", "chat", body(top_p=1.5), None, 400, "invalid_request_error"),
    ("presence_penalty 3", "chat", body(presence_penalty=3), None, 400, "invalid_request_error"),
    ("frequency_penalty -3", "chat", body(frequency_penalty=-3), None, 400, "invalid_request_error"),
    ("seed float", "chat", body(seed=1.5), None, 400, "invalid_request_error"),
    ("seed 2^64", "chat", body(seed=2**64), None, 400, "invalid_request_error"),
    ("stop 5 sequences", "chat", body(stop=["a", "b", "c", "d", "e"]), None, 400, "invalid_request_error"),
    ("stop a number", "chat", body(stop=3), None, 400, "invalid_request_error"),
    ("logit_bias 500", "chat", body(logit_bias={"15": 500}), None, 400, "invalid_request_error"),
    ("logit_bias word key", "chat", body(logit_bias={"hello": 1}), None, 400, "invalid_request_error"),
    ("user a number", "chat", body(user=5), None, 400, "invalid_request_error"),
    ("logprobs", "chat", body(logprobs=True), None, 400, "invalid_request_error"),
    ("top_logprobs", "chat", body(top_logprobs=3), None, 400, "invalid_request_error"),
    ("tools", "chat", body(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400, "invalid_request_error"),
    ("tool_choice", "chat", body(tool_choice="required"), None, 400, "invalid_request_error"),
    ("response_format", "chat", body(response_format={"type": "json_object"}), None, 400, "invalid_request_error"),
    ("unknown field", "chat", body(frobnicate=1), None, 400, "invalid_request_error"),
    ("sample index negative", "chat", body(clear_sample_index=-1), None, 400, "invalid_request_error"),
    ("sample index out of range", "chat", body(clear_sample_index=10**6), None, 400, "invalid_request_error"),
    ("echo", "completion", completion(echo=True), None, 400, "invalid_request_error"),
    ("best_of 3", "completion", completion(best_of=3), None, 400, "invalid_request_error"),
    ("suffix", "completion", completion(suffix="end"), None, 400, "invalid_request_error"),
    ("completion logprobs", "completion", completion(logprobs=5), None, 400, "invalid_request_error"),
    ("batched prompts", "completion", completion(prompt=["a", "b"]), None, 400, "invalid_request_error"),
    ("token-id prompt", "completion", completion(prompt=[1, 2, 3]), None, 400, "invalid_request_error"),
    ("empty prompt", "completion", completion(prompt=""), None, 400, "invalid_request_error"),
    ("prompt beyond context", "completion", completion(prompt="word " * 40000), None, 400, "context_length_exceeded"),
    ("body over the limit", "chat", body(user="x" * 2_000_000), None, 413, "request_too_large"),
    ("no key", "chat", body(), {"authorization": None}, 401, "authentication_error"),
    ("wrong key", "chat", body(), {"authorization": "Bearer nope"}, 401, "authentication_error"),
]]




@dataclass
class Outcome:
    case: Case
    status: int
    error_type: str | None
    clean: bool  # a JSON error body without a traceback, a path or an address

    @property
    def right(self) -> bool:
        return self.status == self.case.status and self.error_type == self.case.error_type and self.clean


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    books_before: tuple = ()
    books_after: tuple = ()

    @property
    def right(self) -> int:
        return sum(o.right for o in self.outcomes)

    @property
    def books_untouched(self) -> bool:
        return self.books_before == self.books_after


def _books(resp: httpx.Response) -> tuple:
    """The budget's books from ``/v1/clear/status`` (a one-line error if the service cannot say)."""
    try:
        st = resp.json()
        return (st["arrivals"], st["allocated_tokens_total"], st["reserved_tokens"], st["spent_tokens"])
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {resp.request.url} answered {resp.status_code}, not the budget's status: "
                         f"{resp.text[:200]!r}") from None


def run(url: str, api_key: str | None = None, timeout_s: float = 60.0) -> Report:
    """Send every case to ``url`` (a base URL without /v1) and compare the books before and after."""
    auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
    report = Report()
    with httpx.Client(timeout=timeout_s) as http:
        report.books_before = _books(http.get(f"{url}/v1/clear/status", headers=auth))
        for case in BAD_INPUTS:
            headers = {"content-type": "application/json", **auth, **case.headers}
            headers = {k: v for k, v in headers.items() if v is not None}
            if "authorization" in case.headers and api_key is None:
                continue  # the authentication cases need a server with keys
            r = http.post(f"{url}{PATHS[case.kind]}", content=case.raw, headers=headers)
            try:
                err = r.json()["error"]
                etype, text = err["type"], str(err.get("message", ""))
                clean = not any(t in text for t in ("Traceback", 'File "', "pid=", "ip="))
            except (ValueError, KeyError, TypeError):
                etype, clean = None, False
            report.outcomes.append(Outcome(case, r.status_code, etype, clean))
        report.books_after = _books(http.get(f"{url}/v1/clear/status", headers=auth))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.hostile_inputs", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000 (a trailing /v1 "
                   "is dropped)")
    p.add_argument("--api-key", default=None, help="a valid bearer key, when the service has keys")
    args = p.parse_args(argv)
    url = normalize_base_url(args.url)
    try:
        report = run(url, args.api_key)
    except httpx.HTTPError as exc:
        print(f"{p.prog}: error: cannot reach {url}: {type(exc).__name__}: {str(exc) or 'no answer'}", file=sys.stderr)
        return 2
    for o in report.outcomes:
        mark = "ok " if o.right else "BAD"
        print(f"{mark} {o.case.name:32s} {o.status} {o.error_type} (want {o.case.status} {o.case.error_type})")
    print(json.dumps({"cases": len(report.outcomes), "right_4xx": report.right,
                      "books_untouched": report.books_untouched}))
    return 0 if report.right == len(report.outcomes) and report.books_untouched else 1


if __name__ == "__main__":
    sys.exit(main())
