"""Allocator deployment: the one central actor holding the global token budget.

A thin wrapper (deploy with exactly one replica) around the pure, synchronous
:class:`clear_core.online_market.OnlineMarket` / :class:`clear_core.ledger.TokenLedger`
pair, which holds all the logic and is unit-tested without Ray. Every command
runs under one lock and without awaiting inside it, so commands are applied
one at a time in arrival order whatever the concurrency: the budget invariant
``reserved + spent <= granted`` is the ledger's, checked after every command.

Leases: every ingress replica renews a lease (:meth:`Allocator.renew`) and
tags its reservations with it; a background sweep every ``sweep_interval_s``
recovers the reservations of a replica whose lease lapsed (charged nothing,
the caps back to the pool) and expires, charged in full, reservations older
than the budget's TTL (the backstop). Settles are idempotent: the ingress
retries a settle until it is acknowledged, and a settle of a reservation that
is no longer open is acknowledged without changing the books.

Durability: with a state store (:mod:`deployments.state_store`) every
command that changes the books writes a snapshot before it answers, and a
replica that Serve restarts after a crash restores it: the budget granted and
spent so far, the open reservations with their owners, and the token counters
survive (the counters continue from the books, they do not restart at 0), so
the invariant holds across an allocator restart. With ``budget_name`` set, the
books are kept under that name and survive redeploys and ``serve run``
restarts too; without it every deploy starts fresh books.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from clear_core.errors import ClearError, UnknownReservationError
from clear_core.ledger import Settlement, TokenLedger
from clear_core.online_market import DEFAULT_TENANT, Decision, OnlineMarket
from clear_core.policies import parse_policy
from clear_core.predictions import read_predictions
from deployments.background import cancel_on_stop
from deployments.config import AllocatorConfig
from deployments.state_store import state_store_for

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
            store = state_store_for(config, state_key)
        self.store = store
        snap = self.store.load() if self.store is not None else None
        budget = config.budget.to_budget()
        self.restored = snap is not None and snap["ledger"].get("budget") == budget.to_dict()
        if snap is not None and not self.restored:
            logger.warning("allocator state under this key has another budget; starting fresh books")
        self.ledger = (TokenLedger.restore(snap["ledger"]) if self.restored
                       else TokenLedger(budget, lease_ttl_s=config.lease_ttl_s))
        self.market = OnlineMarket(
            self.policy,
            self.ledger,
            window_size=self.config.pricing_window_requests,
            context_limit_tokens=max_completion_tokens,
            min_rate_span_s=self.config.min_rate_span_s,
            pace=self.config.pace_budget,
            outcome_window=self.config.abandonment_window_requests,
            tenant_weights=dict(self.config.tenant_weights),
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
            if self.restored:  # the counters continue from the restored books
                self.metrics.count_books(self.ledger.state())
            self._publish()

    # -- commands --------------------------------------------------------------

    def reserve_sync(
        self, rid: str, threshold_tokens: float, log_sigma: float = 0.0, client_cap_tokens: int | None = None,
        owner: str | None = None, arrival_key: str | None = None, retry: bool = False, runaway: float = 0.0,
        tenant: str = DEFAULT_TENANT,
    ) -> Decision:
        t0 = time.perf_counter()
        with self._lock:
            before, tenants = self.ledger.state(), self.market.tenant_snapshot()
            d = self.market.request(
                rid, float(threshold_tokens), log_sigma=float(log_sigma), runaway=float(runaway), tenant=str(tenant),
                client_cap_tokens=client_cap_tokens, owner=owner, arrival_key=arrival_key, retry=bool(retry),
            )
            self._check()
            self._persist()
            state = self.ledger.state()
            tenants_after = self.market.tenant_snapshot()
        if self.metrics:
            self.metrics.clearing.observe(time.perf_counter() - t0, tags=self.metrics.tags)
            self.metrics.count_change(before, state)
            self.metrics.count_tenants(tenants, tenants_after)
            self._publish(state)
        return d

    def settle_sync(self, rid: str, generated: int, failed: bool = False) -> Settlement | None:
        """End a request (``failed``: answered with an error, charged only what it generated).

        Idempotent: a reservation that is not open (settled already, recovered,
        expired, or never made because the reserve failed) is acknowledged
        with ``None`` and the books do not change.
        """
        with self._lock:
            before, tenants = self.ledger.state(), self.market.tenant_snapshot()
            try:
                s = self.market.settle(rid, int(generated), failed=bool(failed))
            except UnknownReservationError:
                logger.debug("settle of %s: no open reservation (already settled, recovered or never made)", rid)
                return None
            self._check()
            self._persist()
            state = self.ledger.state()
            tenants_after = self.market.tenant_snapshot()
        if self.metrics:
            self.metrics.count_change(before, state)
            self.metrics.count_tenants(tenants, tenants_after)
            self._publish(state)
        return s

    def renew_sync(self, owner: str) -> int:
        """Renew an ingress replica's lease (not persisted: a restart gives every owner a fresh lease)."""
        with self._lock:
            return self.ledger.renew(str(owner))

    def expire_sync(self) -> list[str]:
        """Recover the reservations of lapsed leases (no charge), expire those past the TTL (full charge)."""
        with self._lock:
            before = self.ledger.state()
            recovered = self.ledger.release_lapsed()
            gone = self.ledger.expire()
            self._check()
            if gone or recovered:
                self._persist()
            state = self.ledger.state()
        if recovered:
            logger.warning("recovered %d reservations (%d tokens) of ingress replicas whose lease lapsed",
                           len(recovered), sum(c for _, c in recovered))
        if gone:
            logger.warning("expired %d reservations never settled (charged in full)", len(gone))
        if self.metrics:
            self.metrics.count_change(before, state)
            self._publish(state)
        return [rid for rid, _ in recovered] + gone

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
                "expired_tokens_total": st.expired_tokens_total,
                "recovered_reservations_total": st.recovered_total,
                "recovered_tokens_total": st.recovered_tokens_total,
                "failed_requests_total": st.failed_total,
                "leases": st.owners,
                "invariant_holds": st.invariant_holds,
                "books_reconcile": st.reconciles,
                "restored_after_restart": self.restored,
                "budget_name": self.config.budget_name,
                "tenants": self.market.tenant_snapshot(),
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
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                self.expire_sync()
            except Exception:
                logger.exception("reservation sweep failed")

    async def reserve(
        self, rid: str, threshold_tokens: float, log_sigma: float = 0.0, client_cap_tokens: int | None = None,
        owner: str | None = None, arrival_key: str | None = None, retry: bool = False, runaway: float = 0.0,
        tenant: str = DEFAULT_TENANT,
    ) -> Decision:
        self._ensure_sweeper()
        return self.reserve_sync(rid, threshold_tokens, log_sigma, client_cap_tokens, owner, arrival_key, retry,
                                 runaway, tenant)

    async def settle(self, rid: str, generated: int, failed: bool = False) -> Settlement | None:
        self._ensure_sweeper()
        return self.settle_sync(rid, generated, failed)

    async def renew(self, owner: str) -> int:
        self._ensure_sweeper()
        return self.renew_sync(owner)

    async def status(self) -> dict:
        return self.status_sync()

    def __del__(self):
        """Serve calls this when the replica stops: end the sweep loop (deployments.background)."""
        cancel_on_stop(getattr(self, "_sweeper", None))
