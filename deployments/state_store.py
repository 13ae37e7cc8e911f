"""Where the allocator keeps its books so that a restart does not reset the budget.

The allocator writes a snapshot of its ledger and pricing window after every
command that changes them (write-through, before the caller gets its answer),
to Ray's cluster key-value store in the GCS, which outlives any replica. A
replica that Serve restarts after a crash reads it back in ``__init__``.

Which books a replica finds (:func:`state_key`):

* with ``allocator.budget_name`` set, the key is that name: a restarted
  replica, a redeploy and a new ``serve run`` all find the same books (a new
  name starts fresh ones);
* without it, the key carries a *deploy id* minted by the app builder: a
  restarted replica is built from the same arguments and finds its books; a
  new ``serve run`` or redeploy mints a new id and starts a fresh budget.

Where (``allocator.state_store``): ``gcs`` is Ray's GCS key-value store. It
outlives replicas and redeploys, but not the Ray cluster unless the GCS is
fault tolerant (KubeRay with an external Redis); ``serve run`` on a local Ray
starts a new cluster each time. ``file`` keeps one JSON file per budget under
``allocator.advanced.state_dir`` (written atomically): it outlives the cluster, on the
one node that holds the directory (local runs, or a persistent volume).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

NAMESPACE = "clear"


class KVStateStore:
    """JSON snapshots in Ray's internal KV (GCS) under one key."""

    def __init__(self, key: str):
        self.key = key.encode()

    def load(self) -> dict | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.key, namespace=NAMESPACE)
        return None if raw is None else json.loads(raw)

    def save(self, snapshot: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, json.dumps(snapshot, separators=(",", ":")).encode(), overwrite=True,
                         namespace=NAMESPACE)


class MemoryStateStore:
    """The same interface in process memory (tests, or durability off)."""

    def __init__(self):
        self.saved: dict | None = None

    def load(self) -> dict | None:
        return None if self.saved is None else json.loads(json.dumps(self.saved))

    def save(self, snapshot: dict) -> None:
        self.saved = json.loads(json.dumps(snapshot))


class FileStateStore:
    """JSON snapshots in one file, replaced atomically (write a temporary file, then rename)."""

    def __init__(self, directory: str, key: str):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)
        self.path = Path(os.path.expanduser(directory)) / f"{safe}.json"

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, snapshot: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(snapshot, f, separators=(",", ":"))
        os.replace(tmp, self.path)


def state_key(budget_name: str | None, deploy_id: str) -> str:
    """The key of an allocator's books: its budget's name, else this deploy's id (module docstring)."""
    return f"budget/{budget_name}" if budget_name else f"allocator/{deploy_id}"


def state_store_for(config, key: str):
    """The store an :class:`~deployments.config.AllocatorConfig` asks for."""
    if config.state_store == "file":
        return FileStateStore(config.advanced.state_dir, key)
    return KVStateStore(key)
