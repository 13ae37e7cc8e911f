"""A local Ray and Serve for a benchmark: the HTTP proxy on a free port of 127.0.0.1, both shut down after."""

from __future__ import annotations

import contextlib
import socket


@contextlib.contextmanager
def local_serve(num_cpus: int = 2):
    """Start Ray (``num_cpus`` logical CPUs, no dashboard) and Serve; yield the proxy's port."""
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
