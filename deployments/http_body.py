"""Reading a request body without letting a slow or stalled client hold the service.

Ray Serve's proxy hands a request to the ingress replica as soon as its
headers arrive; the replica then pulls the body from the proxy. A client that
sends headers and part of a body (or nothing) would hold one of the replica's
``max_ongoing_requests`` slots for as long as it likes, and a few hundred of
them take every slot. :func:`read_body` bounds that:

* the whole body must arrive within ``timeout_s`` (else 408);
* its size is counted as it arrives, so the limit holds for chunked bodies
  without a ``Content-Length`` too (else 413, without reading the rest);
* a body that has not arrived within ``fast_s`` makes its request a *slow
  reader*, and a replica admits at most ``gate.limit`` slow readers at once
  (:class:`SlowReaderGate`, ``ingress.advanced.max_slow_body_reads``); one more is
  refused at once (408). Normal clients (a JSON body arrives with its headers)
  never wait for the gate, so stalled connections can take at most
  ``gate.limit`` slots, each for at most ``timeout_s``.

Headers that never finish never reach a replica (Ray's proxy holds them);
their timeout belongs to the load balancer in front (docs/operations.md).
"""

from __future__ import annotations

import asyncio

from deployments.errors import ClientDisconnectedError, RequestTimeoutError, RequestTooLargeError


class SlowReaderGate:
    """At most ``limit`` requests of one replica may be waiting for a late body at once."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.active = 0

    def try_enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1


async def read_body(receive, *, max_bytes: int, timeout_s: float, fast_s: float, gate: SlowReaderGate) -> bytes:
    """The whole body of one request (ASGI ``receive``), within the limits of the module docstring."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = bytearray()
    slow = False  # this request holds a place in the gate
    try:
        while True:
            task = asyncio.ensure_future(receive())
            try:
                while not task.done():
                    left = deadline - loop.time()
                    if left <= 0:
                        raise RequestTimeoutError(f"the request body did not arrive within {timeout_s:g} s")
                    await asyncio.wait({task}, timeout=left if slow else min(left, fast_s))
                    if not task.done() and not slow:
                        if not gate.try_enter():
                            raise RequestTimeoutError(
                                "the request body is arriving too slowly, and this server is already waiting "
                                f"for {gate.limit} slow request bodies"
                            )
                        slow = True
            finally:
                if not task.done():
                    task.cancel()
            message = task.result()
            if message["type"] == "http.disconnect":
                raise ClientDisconnectedError("the client disconnected while sending the request body")
            body += message.get("body", b"")
            if len(body) > max_bytes:
                raise RequestTooLargeError(f"the request body exceeds {max_bytes} bytes")
            if not message.get("more_body", False):
                return bytes(body)
    finally:
        if slow:
            gate.leave()
