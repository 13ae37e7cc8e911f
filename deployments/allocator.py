"""Allocator deployment: the one central actor holding the global token budget.

A thin wrapper (deploy with exactly one replica) around the pure, synchronous
:class:`clear_core.online_market.OnlineMarket` / :class:`clear_core.ledger.TokenLedger`
pair, which holds all the logic and is unit-tested without Ray. Every command
runs under one lock and without awaiting inside it, so commands are applied
one at a time in arrival order whatever the concurrency: the budget invariant
``reserved + spent <= granted`` is the ledger's, checked after every command.

A background sweep expires reservations never settled (their ingress died)
every ``expire_interval_s``.

Durability: with a state store (the builder passes a deploy id, and the
replica keeps its books in Ray's GCS key-value store, see
:mod:`deployments.state_store`) every command that changes the books writes a
snapshot before it answers, and a replica that Serve restarts after a crash
restores it: the budget granted and spent so far and the open reservations
survive, so the invariant holds across an allocator restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from clear_core.errors import ClearError, UnknownReservationError
from clear_core.ledger import Settlement, TokenLedger
from clear_core.online_market import Decision, OnlineMarket
from clear_core.policies import parse_policy
from clear_core.predictions import read_predictions
from deployments.config import AllocatorConfig
from deployments.state_store import KVStateStore

logger = logging.getLogger("ray.serve")


def load_seed_thresholds(path: str, limit: int) -> list[float]:
    """The last ``limit`` thresholds of a predictions JSONL (clear_core.predictions)."""
    return [r.threshold_tokens for r in read_predictions(path).rows][-max(limit, 1):]


class Allocator:
    def __init__(
        self,
        config: AllocatorConfig,
        max_completion_tokens: int | None = None,
        metrics: bool = True,
        state_key: str | None = None,
        store=None,
    ):
        self.config = config
        self.policy_spec = config.policy
        self.policy = parse_policy(config.policy)
        if store is None and state_key is not None:
            store = KVStateStore(state_key)
        self.store = store
        snap = self.store.load() if self.store is not None else None
        budget = config.budget.to_budget()
        self.restored = snap is not None and snap["ledger"].get("budget") == budget.to_dict()
        if snap is not None and not self.restored:
            logger.warning("allocator state under this key has another budget; starting fresh books")
        self.ledger = TokenLedger.restore(snap["ledger"]) if self.restored else TokenLedger(budget)
        self.market = OnlineMarket(
            self.policy,
            self.ledger,
            window_size=self.config.pricing_window_requests,
            context_limit_tokens=max_completion_tokens,
            min_rate_span_s=self.config.min_rate_span_s,
            pace=self.config.pace_budget,
            outcome_window=self.config.abandonment_window_requests,
        )
        if self.restored:
            self.market.restore(snap["market"])
            logger.warning("allocator restored its books: %s", self.ledger.state())
        elif self.config.pricing_window_seed_path:
            self.market.seed(load_seed_thresholds(self.config.pricing_window_seed_path,
                                                  self.config.pricing_window_requests))
        self._lock = threading.Lock()
        self._sweeper: asyncio.Task | None = None
        self.metrics = None
        if metrics:
            from deployments.metrics import AllocatorMetrics

            self.metrics = AllocatorMetrics(self.policy_spec)
            self._publish()

    # -- commands --------------------------------------------------------------

    def reserve_sync(
        self, rid: str, threshold_tokens: float, log_sigma: float = 0.0, client_cap_tokens: int | None = None
    ) -> Decision:
        t0 = time.perf_counter()
        with self._lock:
            d = self.market.request(
                rid, float(threshold_tokens), log_sigma=float(log_sigma), client_cap_tokens=client_cap_tokens
            )
            self._check()
            self._persist()
            state = self.ledger.state()
        if self.metrics:
            self.metrics.clearing.observe(time.perf_counter() - t0, tags=self.metrics.tags)
            if d.admitted and d.cap_tokens > 0:  # Ray counters refuse increments <= 0
                self.metrics.allocated.inc(float(d.cap_tokens), tags=self.metrics.tags)
            self._publish(state)
        return d

    def settle_sync(self, rid: str, generated: int) -> Settlement | None:
        """End a request; an unknown id (settled twice, expired, allocator restarted) is ignored."""
        with self._lock:
            try:
                s = self.market.settle(rid, int(generated))
            except UnknownReservationError:
                logger.warning("settle of unknown reservation %s ignored", rid)
                return None
            self._check()
            self._persist()
            state = self.ledger.state()
        if self.metrics:
            if s.generated > 0:  # Ray counters refuse increments <= 0
                self.metrics.generated.inc(float(s.generated), tags=self.metrics.tags)
            if s.refunded > 0:
                self.metrics.refunded.inc(float(s.refunded), tags=self.metrics.tags)
            self._publish(state)
        return s

    def expire_sync(self) -> list[str]:
        with self._lock:
            gone = self.ledger.expire()
            self._check()
            if gone:
                self._persist()
            state = self.ledger.state()
        if gone:
            logger.warning("expired %d reservations never settled", len(gone))
        if self.metrics:
            if gone:
                self.metrics.expired.inc(float(len(gone)), tags=self.metrics.tags)
            self._publish(state)
        return gone

    def status_sync(self) -> dict:
        with self._lock:
            st = self.ledger.state()
            budget = self.ledger.budget.to_dict()
            return {
                "policy": self.policy_spec,
                "budget_mode": budget.pop("mode"),
                **budget,  # the mode's own fields: tokens_per_query, window_queries | tokens_per_s, burst_tokens

                "available_tokens": st.available,
                "reserved_tokens": st.reserved,
                "spent_tokens": st.spent,
                "granted_tokens": st.granted,
                "in_flight_reservations": st.in_flight,
                "shadow_price": self.market.last_price,
                "abandonment_rate": self.market.abandonment_rate(),
                "abandonment_window_requests": self.config.abandonment_window_requests,
                "pricing_window_filled": len(self.market.window()),
                "pricing_window_requests": self.config.pricing_window_requests,
                "arrivals": st.arrivals,
                "allocated_tokens_total": st.allocated_total,
                "generated_tokens_total": st.generated_total,
                "refunded_tokens_total": st.refunded_total,
                "expired_reservations_total": st.expired_total,
                "invariant_holds": st.invariant_holds,
                "restored_after_restart": self.restored,
            }

    def _persist(self) -> None:
        """Write-through snapshot (called under the lock, before the caller gets its answer)."""
        if self.store is not None:
            self.store.save({"ledger": self.ledger.snapshot(), "market": self.market.snapshot()})

    def _check(self) -> None:
        st = self.ledger.state()
        if not st.invariant_holds:  # never expected: the ledger refuses such commands
            raise ClearError(f"budget invariant broken: reserved {st.reserved} + spent {st.spent} > {st.granted}")

    def _publish(self, state=None) -> None:
        state = state or self.ledger.state()
        self.metrics.observe_state(state, self.market.last_price, self.market.abandonment_rate())

    # -- Serve entry points (async: applied one at a time on the replica's loop) --

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.expire_interval_s)
            try:
                self.expire_sync()
            except Exception:
                logger.exception("reservation sweep failed")

    async def reserve(
        self, rid: str, threshold_tokens: float, log_sigma: float = 0.0, client_cap_tokens: int | None = None
    ) -> Decision:
        self._ensure_sweeper()
        return self.reserve_sync(rid, threshold_tokens, log_sigma, client_cap_tokens)

    async def settle(self, rid: str, generated: int) -> Settlement | None:
        self._ensure_sweeper()
        return self.settle_sync(rid, generated)

    async def status(self) -> dict:
        return self.status_sync()
