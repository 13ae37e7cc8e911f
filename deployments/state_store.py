"""Where the allocator keeps its books so that a restart does not reset the budget.

The allocator writes a snapshot of its ledger and pricing window after every
command that changes them (write-through, before the caller gets its answer),
to Ray's cluster key-value store in the GCS, which outlives any replica. A
replica that Serve restarts after a crash reads it back in ``__init__``.

The key carries a *deploy id* minted by the app builder: a restarted replica
is built from the same arguments and finds its books; a new ``serve run`` or
redeploy mints a new id and starts a fresh budget.
"""

from __future__ import annotations

import json

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
