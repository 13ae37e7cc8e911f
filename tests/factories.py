"""Small factories the tests share (the pattern of vLLM's ``create_requests``)."""

from __future__ import annotations

import copy


class FakeClock:
    """A clock the test moves by hand: ``clock.t += 5``."""

    def __init__(self, t: float = 0.0):
        self.t = float(t)

    def __call__(self) -> float:
        return self.t


#: The smallest app the cluster tests deploy: replay engine on the synthetic
#: workload, heuristic predictor, CLEAR at 512 tokens per query.
BASE_APP_ARGS = {
    "model_name": "clear-replay",
    "allocator": {
        "policy": "clear",
        "budget": {"mode": "per_query", "tokens_per_query": 512, "window_queries": 500},
    },
    "predictor": {"backend": "heuristic"},
    "engine": {"kind": "replay"},
}


def app_args(**overrides) -> dict:
    """``BASE_APP_ARGS`` with nested overrides merged in.

    Dicts merge, other values replace; a dict that names another member of a
    tagged union (its ``mode`` or ``kind`` differs, e.g. a ``rate`` budget)
    replaces the base's dict whole, since the other member's fields do not apply.
    """
    out = copy.deepcopy(BASE_APP_ARGS)
    _merge(out, overrides)
    return out


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        base = into.get(key)
        retagged = isinstance(base, dict) and isinstance(value, dict) and any(
            tag in value and value[tag] != base.get(tag) for tag in ("mode", "kind"))
        if isinstance(value, dict) and isinstance(base, dict) and not retagged:
            _merge(base, value)
        else:
            into[key] = copy.deepcopy(value)
