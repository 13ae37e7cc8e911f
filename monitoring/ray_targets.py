"""Where a running Ray cluster exports its metrics, asked of that cluster (never guessed from /tmp/ray).

    python monitoring/ray_targets.py --address auto
    python monitoring/ray_targets.py --address auto --file-sd monitoring/prometheus/ray_targets.json

``/tmp/ray/session_latest`` and ``/tmp/ray/prom_metrics_service_discovery.json`` belong to
whichever cluster started last on the host: with several clusters on one host they name
the wrong one. This connects to the cluster at ``--address`` (its GCS, what ``ray start
--head`` prints; or ``RAY_ADDRESS``) and prints one ``host:port`` per live node (each
node's metrics export port, from ``ray.nodes()``) and the cluster's own session folder
(``ray._private.worker._global_node.get_session_dir_path()``). ``--file-sd`` writes the
targets as a Prometheus file-based service-discovery file, the one
``monitoring/prometheus/prometheus.yml`` reads. Under KubeRay use the PodMonitors instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def metrics_targets(nodes: list[dict]) -> list[str]:
    """``host:port`` of the metrics export port of every live node of ``ray.nodes()``."""
    out = []
    for node in nodes:
        alive = node.get("Alive", node.get("alive"))
        port = node.get("MetricsExportPort")
        if alive and port:
            out.append(f"{node['NodeManagerAddress']}:{port}")
    return out


def file_sd(targets: list[str]) -> list[dict]:
    """Prometheus file-based service discovery (https://prometheus.io/docs/guides/file-sd/), job ``ray``."""
    return [{"labels": {"job": "ray"}, "targets": targets}]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python monitoring/ray_targets.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get("RAY_ADDRESS") or None  # set and not empty
    p.add_argument("--address", default=env, required=env is None,
                   help="the cluster's GCS address, HOST:PORT (default: $RAY_ADDRESS"
                   + (f", now {env})" if env else ", unset)"))
    p.add_argument("--file-sd", type=Path, default=None,
                   help="also write the targets here as a Prometheus file_sd JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import ray

    try:
        ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        parser.exit(2, f"{parser.prog}: error: no Ray cluster at {args.address}: {' '.join(str(exc).split())}\n")
    try:
        targets = metrics_targets(ray.nodes())
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    finally:
        ray.shutdown()  # disconnects this driver; the cluster keeps running
    if args.file_sd is not None:
        try:
            args.file_sd.write_text(json.dumps(file_sd(targets), indent=1) + "\n")
        except OSError as exc:
            parser.exit(2, f"{parser.prog}: error: argument --file-sd: {args.file_sd}: {exc.strerror}\n")
    print(f"session folder: {session_dir}", file=sys.stderr)
    print("\n".join(targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
