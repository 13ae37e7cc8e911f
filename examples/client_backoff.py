"""A chat-completions client for the CLEAR service that retries 429 and 503 the way the server asks.

    python examples/client_backoff.py --url http://127.0.0.1:8000 --prompt "What is 17 * 23?"

What CLEAR's refusals carry (deployments/openai_schema.py, ``error_body`` and ``retry_headers``):

* headers: ``Retry-After`` (whole seconds, at least 1) and ``x-should-retry`` (``true`` / ``false``);
* body: ``{"error": {"type", "message", "should_retry", "retry_after_s", "shadow_price",
  "predicted_threshold_tokens"}}`` for a 429 (the last four only there).

The two 429s differ. ``budget_abandoned``: at the current shadow price the request does not
pay for its tokens, and will not until the recent demand turns over, so the server says
``should_retry: false``. ``budget_pool_empty``: the request is worth serving but the pool is
drained; ``Retry-After`` is the refill time and ``should_retry`` is true when a refill will
cover it. A 503 ``allocator_unavailable`` (the allocator is restarting) says retry after 1 s.

What this client does:

* retries only 429 and 503, and only when the server does not say no: ``x-should-retry``
  decides, else the body's ``should_retry``, else (a 429/503 with no advice) it retries;
* waits ``max(Retry-After, backoff)``, ``backoff = min(max_delay_s, base_delay_s * 2**(n-1))``
  scaled by a random factor in [0.5, 1] (jitter, so clients refused together do not all
  come back in the same instant), never less than the server asked;
* gives up when the server asks for a longer wait than ``give_up_after_s``, and after
  ``max_attempts`` attempts in all;
* sends one ``Idempotency-Key`` with every attempt of a request, so the market counts the
  retries as one arrival (no extra budget, no double count in the price).

The ``openai`` Python client also reads ``x-should-retry`` and short ``Retry-After`` values;
this file shows the rule without it, with the standard library only.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

logger = logging.getLogger("clear_client")

#: The statuses CLEAR answers with a Retry-After: 429 (abandoned by the budget), 503 (allocator restarting).
RETRYABLE_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # attempts in all, the first included
    base_delay_s: float = 0.5  # backoff before the second attempt (before jitter)
    max_delay_s: float = 30.0  # ceiling of the backoff (a longer Retry-After is still honoured)
    give_up_after_s: float = 60.0  # a server asking for a longer wait than this ends the request

    def backoff_s(self, failures: int, rand: float) -> float:
        """Backoff after ``failures`` failed attempts, ``rand`` in [0, 1] the jitter draw."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (failures - 1)) * (0.5 + 0.5 * rand)


class ClearRequestError(RuntimeError):
    """The request failed for good: the last status, error type and message, and the attempts made."""

    def __init__(self, status: int, error: dict, attempts: int, why: str):
        self.status = status
        self.error_type = error.get("type") or "unknown"
        self.attempts = attempts
        message = " ".join(str(error.get("message") or "").split())
        super().__init__(f"HTTP {status} {self.error_type} after {attempts} attempt(s), {why}: {message}")


def should_retry(status: int, headers, error: dict) -> bool:
    """Whether the server's answer invites a retry (the header, else the body, else yes for 429/503)."""
    if status not in RETRYABLE_STATUS:
        return False
    header = headers.get("x-should-retry")
    if header is not None:
        return header.strip().lower() == "true"
    flag = error.get("should_retry")
    return flag if isinstance(flag, bool) else True


def server_wait_s(headers, error: dict) -> float:
    """The wait the server asks for: Retry-After in seconds, else the body's retry_after_s, else 0."""
    for value in (headers.get("Retry-After"), error.get("retry_after_s")):
        try:
            return max(0.0, float(value))
        except (TypeError, ValueError):  # absent, or an HTTP date (CLEAR always sends seconds)
            continue
    return 0.0


def _post(url: str, body: bytes, headers: dict, timeout_s: float) -> tuple[int, object, object]:
    """(status, headers, parsed JSON body); a body that is not JSON becomes an error message."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            status, resp_headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, resp_headers, raw = exc.code, exc.headers, exc.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {"error": {"message": raw[:200].decode("utf-8", "replace")}}
    return status, resp_headers, payload


def chat_completion(
    base_url: str,
    messages: list[dict],
    *,
    model: str = "clear-replay",
    api_key: str | None = None,
    policy: RetryPolicy = RetryPolicy(),
    sleep=None,
    rand=random.random,
    timeout_s: float = 120.0,
    **fields,
) -> dict:
    """POST /v1/chat/completions, retrying as the module docstring says; the answer's JSON.

    ``fields`` are further request fields (``max_tokens``, ``temperature``...). ``sleep``
    (default ``time.sleep``) and ``rand`` are injectable so a test can record the waits instead
    of sleeping.
    """
    sleep = time.sleep if sleep is None else sleep
    body = json.dumps({"model": model, "messages": messages, **fields}).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/v1/chat/completions"
    for attempt in range(1, policy.max_attempts + 1):
        status, resp_headers, payload = _post(url, body, headers, timeout_s)
        if 200 <= status < 300:
            return payload
        error = payload.get("error") if isinstance(payload, dict) else None
        error = error if isinstance(error, dict) else {}
        if not should_retry(status, resp_headers, error):
            raise ClearRequestError(status, error, attempt, "the server says not to retry")
        if attempt == policy.max_attempts:
            raise ClearRequestError(status, error, attempt, "out of attempts")
        asked = server_wait_s(resp_headers, error)
        if asked > policy.give_up_after_s:
            raise ClearRequestError(status, error, attempt,
                                    f"the server asks for {asked:.0f} s, more than {policy.give_up_after_s:.0f} s")
        wait = max(asked, policy.backoff_s(attempt, rand()))
        logger.warning("HTTP %s %s; retrying in %.2f s (attempt %d of %d)", status, error.get("type"), wait,
                       attempt + 1, policy.max_attempts)
        sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service, without /v1")
    parser.add_argument("--model", default="clear-replay")
    parser.add_argument("--prompt", default="What is 17 * 23?")
    parser.add_argument("--api-key", default=None, help="bearer key, when the service has ingress.api_keys")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-attempts", type=int, default=RetryPolicy.max_attempts)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fields = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    try:
        answer = chat_completion(args.url, [{"role": "user", "content": args.prompt}], model=args.model,
                                 api_key=args.api_key, policy=RetryPolicy(max_attempts=args.max_attempts), **fields)
    except ClearRequestError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, timeout
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    choice = answer["choices"][0]
    print(choice["message"]["content"])
    print(json.dumps({"finish_reason": choice["finish_reason"], "clear": answer.get("clear")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
