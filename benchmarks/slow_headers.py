"""What connections that never finish their request headers cost Ray Serve's HTTP proxy.

The proxy has no timeout on request headers (docs/operations.md, Exposure). This measures the bound: a local
Ray with a small CLEAR app (heuristic predictor, replay engine), then ``--connections`` sockets that each send
the start of a POST's headers and never the end. Printed, before they open, once they are open and after
``--hold-s`` seconds: the p50 of small requests beside them, the proxy's resident memory and open file
descriptors, how many of the sockets the proxy still holds, and the proxy's limit on open files (the number
of such connections that would stop it accepting new ones).

    python benchmarks/slow_headers.py [--connections 1000] [--hold-s 90]
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.local_serve import local_serve  # noqa: E402
from clear_core.cli_args import HelpFormatter, positive_int, run_command  # noqa: E402

BODY = {"model": "clear-replay", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
PARTIAL = b"POST /c/v1/chat/completions HTTP/1.1\r\nHost: clear\r\nContent-Type: application/json\r\n"


def _p50(url: str, n: int = 20) -> float:
    import httpx

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = httpx.post(url, json=BODY, timeout=30)
        out.append(1e3 * (time.perf_counter() - t0))
        if r.status_code != 200:
            raise RuntimeError(f"the app answered {r.status_code}: {r.text[:200]}")
    return sorted(out)[n // 2]


def _still_open(socks) -> int:
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += s.recv(1) != b""  # b"": the proxy closed it
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def _run(args) -> int:
    import psutil
    from ray import serve

    from deployments.app import build_app

    with local_serve() as port:
        serve.run(build_app({"model_name": "clear-replay", "predictor": {"backend": "heuristic"},
                             "engine": {"kind": "replay"}}), name="c", route_prefix="/c")
        url = f"http://127.0.0.1:{port}/c/v1/chat/completions"
        proxy = next(p for p in psutil.process_iter(["cmdline"]) if "ProxyActor" in " ".join(p.info["cmdline"] or []))
        soft, hard = proxy.rlimit(resource.RLIMIT_NOFILE)
        print(f"Ray Serve's proxy: open-file limit {soft} (hard {hard})")
        print("| when | p50 of a small request, ms | proxy RSS, MiB | proxy open files | partial-header sockets held |")
        print("|---|---|---|---|---|")

        def row(when, held):
            print(f"| {when} | {_p50(url):.1f} | {proxy.memory_info().rss >> 20} | {proxy.num_fds()} | {held} |",
                  flush=True)

        row("before", 0)
        socks = []
        for _ in range(args.connections):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(PARTIAL)  # the headers never end
            socks.append(s)
        time.sleep(2.0)
        row(f"{args.connections} opened", _still_open(socks))
        time.sleep(args.hold_s)
        row(f"{args.hold_s:.0f} s later", _still_open(socks))
        for s in socks:
            s.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/slow_headers.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--connections", type=positive_int, default=1000, help="sockets that never finish their headers")
    ap.add_argument("--hold-s", type=float, default=90.0, help="how long to hold them before the last look, s")
    args = ap.parse_args(argv)
    return run_command(ap.prog, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
