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

Decisions at the ingress (``allocator.decisions: ingress``): the ingress
replicas price requests from a quote and reserve against budget leases
(:mod:`clear_core.lease`, :mod:`deployments.lease_client`); the allocator only
answers their reports (:meth:`Allocator.report`): it reconciles the leases,
absorbs the arrivals into the pricing window, lends more, and answers the new
quote. A lease whose owner stops reporting lapses and returns to the pool.

Durability: with a state store (:mod:`deployments.state_store`) the books are
written as snapshots by a background task, off the event loop (the JSON and
the store's I/O run in a thread). Commands that could let a restart overspend
wait for the snapshot that contains them before they are answered: a
reservation (central) and a lease grant (ingress). So does a settle: it only
makes the books tighter, but the ingress stops retrying it once acknowledged
and keeps renewing its lease, so a restart that reopened it would hold its
cap for good. Concurrent ones share one write (group commit). Reports and
expiries are conservative to miss (a report is cumulative and comes again; an
expiry is redone by the next sweep); they are written within
``snapshot_interval_s``. A
replica that Serve restarts after a crash restores the last snapshot: the budget granted and
spent so far, the open reservations with their owners, and the token counters
survive (the counters continue from the books, they do not restart at 0), so
the invariant holds across an allocator restart. With ``budget_name`` set, the
books are kept under that name and survive redeploys and ``serve run``
restarts too; without it every deploy starts fresh books.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from clear_core.calibration import Calibration
from clear_core.errors import ClearError, UnknownReservationError
from clear_core.lease import LeaseReply, LeaseReport, answer_report
from clear_core.ledger import Settlement, TokenLedger
from clear_core.online_market import DEFAULT_TENANT, Decision, OnlineMarket
from clear_core.servable import servable_policy
from clear_core.predictions import read_predictions
from deployments.background import cancel_on_stop, stop_if_cancelled
from deployments.config import AllocatorConfig
from deployments.state_store import state_store_for

logger = logging.getLogger("ray.serve")


#: A report is answered with a fresh quote at most this often (the last one otherwise), s.
MIN_REQUOTE_S = 0.01


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
        length_calibration: dict | None = None,
        learner=None,
        poll_s: float = 5.0,
        exploration=None,
    ):
        """``learner`` (the length learner's handle, polled every ``poll_s``): the histograms clear-cost-emp
        prices follow the learned model. ``exploration``: probes of would-be-abandoned requests
        (:mod:`clear_core.exploration`), on while the service learns."""
        self.config = config
        self.policy_spec = config.policy
        self.policy = servable_policy(config.policy)
        # clear-cost-emp: the predictor's calibration, whose bins' length histograms the market prices;
        # each request's bin is the bin of its raw predicted threshold (a fallback prediction's too).
        self.calibration = None
        if self.policy.prices_length_histograms:
            if length_calibration is None:
                raise ValueError(f"policy {config.policy} needs the predictor's length calibration")
            self.calibration = Calibration.from_dict(length_calibration)
            if not self.calibration.histograms:
                raise ValueError(f"policy {config.policy} needs a calibration with length histograms")
        if store is None and state_key is not None:
            store = state_store_for(config, state_key)
        self.store = store
        snap = self.store.load() if self.store is not None else None
        budget = config.to_budget()
        self.restored = snap is not None
        #: The books were kept under another budget (a changed config): they continue under this one.
        self.rebudgeted = self.restored and snap["ledger"].get("budget") != budget.to_dict()
        if self.restored:
            self.ledger = TokenLedger.restore(snap["ledger"])
            if self.rebudgeted:
                logger.warning("allocator books kept under budget %s continue under %s (spent stays spent; "
                               "the new budget applies from the next block)", snap["ledger"].get("budget"),
                               budget.to_dict())
                self.ledger.rebudget(budget)
            self.ledger.lease_ttl_s = float(config.advanced.lease_ttl_s)
        else:
            self.ledger = TokenLedger(budget, lease_ttl_s=config.advanced.lease_ttl_s)
        self.market = OnlineMarket(
            self.policy,
            self.ledger,
            window_size=self.config.advanced.pricing_window_requests,
            context_limit_tokens=max_completion_tokens,
            min_rate_span_s=self.config.advanced.min_rate_span_s,
            pace=self.config.advanced.pace_budget,
            block_reserve=self.config.advanced.block_reserve_share,
            outcome_window=self.config.advanced.abandonment_window_requests,
            tenant_weights=dict(self.config.tenant_weights),
            lengths=self.calibration.histograms if self.calibration is not None else (),
            exploration=exploration,
        )
        self.model_version = 0
        self.follower = None
        if learner is not None:
            from deployments.learner_client import ModelFollower

            self.follower = ModelFollower(learner, poll_s, self._apply_model)
        if self.restored:
            self.market.restore(snap["market"])
            logger.warning("allocator restored its books: %s", self.ledger.state())
        elif self.config.advanced.pricing_window_seed_path:
            seed = load_seed_thresholds(self.config.advanced.pricing_window_seed_path, self.config.advanced.pricing_window_requests)
            self.market.seed(seed, bins=None if self.calibration is None else self.calibration.bin_of(seed))
        self._lock = threading.Lock()
        self._sweeper: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._version = 0  # changes to the books so far
        self._written = 0  # the version of the last snapshot written
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._quoted_at = -math.inf
        self.metrics = None
        if metrics:
            from deployments.metrics import AllocatorMetrics

            self.metrics = AllocatorMetrics(self.policy_spec)
            if self.restored:  # the counters continue from the restored books
                self.metrics.count_books(self.ledger.state())
            self._publish()
        try:  # Serve builds the replica on its event loop: sweep and write from the start
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            self._ensure_background()

    # -- commands --------------------------------------------------------------

    def reserve_sync(
        self, rid: str, threshold_tokens: float, log_sigma: float = 0.0, client_cap_tokens: int | None = None,
        owner: str | None = None, arrival_key: str | None = None, retry: bool = False, runaway: float = 0.0,
        tenant: str = DEFAULT_TENANT, raw_threshold_tokens: float | None = None, group: int = 1,
        floor_tokens: int = 1,
    ) -> Decision:
        t0 = time.perf_counter()
        tau, length_bin = float(threshold_tokens), None
        if self.calibration is not None:  # priced on the histogram of the raw prediction's bin
            tau = float(threshold_tokens if raw_threshold_tokens is None else raw_threshold_tokens)
            length_bin = int(self.calibration.bin_of([tau])[0])
        with self._lock:
            before, tenants = self.ledger.state(), self.market.tenant_snapshot()
            d = self.market.request(
                rid, tau, log_sigma=float(log_sigma), runaway=float(runaway), tenant=str(tenant),
                client_cap_tokens=client_cap_tokens, owner=owner, arrival_key=arrival_key, retry=bool(retry),
                length_bin=length_bin, group=int(group), floor_tokens=int(floor_tokens),
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

    def correct_sync(self, rid: str, received: int) -> Settlement | None:
        """A settled request's client left before its answer: charge only ``received`` (TokenLedger.correct)."""
        with self._lock:
            before = self.ledger.state()
            s = self.market.correct(rid, int(received))
            if s is None:
                return None
            self._check()
            self._persist()
            state = self.ledger.state()
        if self.metrics:
            self.metrics.count_change(before, state)
            self._publish(state)
        return s

    def report_sync(self, report: LeaseReport) -> tuple[LeaseReply, bool]:
        """(answer, whether more was lent): :func:`clear_core.lease.answer_report` under the lock.

        A fresh quote is one clearing (``ray_clear_clearing_latency_s``, as a central decision is).
        """
        t0 = time.perf_counter()
        with self._lock:
            before, tenants = self.ledger.state(), self.market.tenant_snapshot()
            now = self.ledger.now()
            requote = now - self._quoted_at >= MIN_REQUOTE_S
            lease = self.ledger.token_lease(str(report.owner))
            granted = lease.granted if lease is not None else 0
            reply = answer_report(self.market, report, requote=requote, now=now)
            if requote:
                self._quoted_at = now
            self._check()
            self._persist()
            state = self.ledger.state()
            tenants_after = self.market.tenant_snapshot()
        if self.metrics:
            if requote:
                self.metrics.clearing.observe(time.perf_counter() - t0, tags=self.metrics.tags)
            self.metrics.count_change(before, state)
            self.metrics.count_tenants(tenants, tenants_after)
            self._publish(state)
        return reply, (not reply.revoked) and reply.granted_total > granted

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
            leased_to = set(self.ledger.token_leases())
            for owner in self.market.reporting_owners():
                if owner not in leased_to and self.ledger.is_revoked(owner):
                    self.market.forget_owner(owner)
            changed = before.leased != self.ledger.state().leased
            self._check()
            if gone or recovered or changed:
                self._persist()
            state = self.ledger.state()
        if recovered:
            logger.warning("recovered %d reservations (%d tokens) of ingress replicas whose lease lapsed",
                           len(recovered), sum(c for _, c in recovered))
        if gone:
            logger.warning("expired %d reservations never settled (charged in full)", len(gone))
        if changed:
            logger.warning("took back %d tokens leased to ingress replicas whose lease lapsed",
                           before.leased - state.leased)
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
                # requests open inside the ingress replicas' leases, as they last reported (decisions: ingress)
                "lease_in_flight_requests": self.market.in_flight() - st.in_flight,
                "shadow_price": self.market.last_price,
                "reservation_price": self.market.last_reservation_price,
                "decisions": self.config.decisions,
                "leased_tokens": st.leased,
                "lease_reserved_tokens": st.lease_reserved,
                "reclaimed_lease_tokens_total": st.reclaimed_lease_tokens_total,
                "quote_version": self.market.last_quote.version if self.market.last_quote else None,
                "length_model_version": self.model_version,
                "explored": self.market.explored.snapshot(),
                "snapshots_written_version": self._written,
                "books_version": self._version,
                "abandonment_rate": self.market.abandonment_rate(),
                "abandonment_window_requests": self.config.advanced.abandonment_window_requests,
                "pricing_window_filled": len(self.market.window()),
                "pricing_window_requests": self.config.advanced.pricing_window_requests,
                "arrivals": st.arrivals,
                "allocated_tokens_total": st.allocated_total,
                "generated_tokens_total": st.generated_total,
                "refunded_tokens_total": st.refunded_total,
                "expired_reservations_total": st.expired_total,
                "expired_tokens_total": st.expired_tokens_total,
                "recovered_reservations_total": st.recovered_total,
                "recovered_tokens_total": st.recovered_tokens_total,
                "failed_requests_total": st.failed_total,
                "late_charged_tokens_total": st.late_charged_tokens_total,
                "late_uncharged_tokens_total": st.late_uncharged_tokens_total,
                "corrected_tokens_total": st.corrected_tokens_total,
                "leases": st.owners,
                "invariant_holds": st.invariant_holds,
                "books_reconcile": st.reconciles,
                "restored_after_restart": self.restored,
                "budget_changed_at_restart": self.rebudgeted,
                "budget": self.ledger.budget.to_dict(),
                "budget_name": self.config.budget_name,
                "tenants": self.market.tenant_snapshot(),
            }

    def _persist(self) -> None:
        """The books changed (under the lock): the next snapshot will hold it (module docstring)."""
        self._version += 1

    def _snapshot(self) -> dict:
        return {"ledger": self.ledger.snapshot(), "market": self.market.snapshot()}

    def flush(self) -> None:
        """Write the books now, synchronously (the async entry points wait for the background writer)."""
        if self.store is not None:
            with self._lock:
                snap, version = self._snapshot(), self._version
            self.store.save(snap)
            self._written = max(self._written, version)

    async def _durable(self) -> None:
        """Wait until a snapshot holding every change made so far is written (group commit)."""
        if self.store is None or self._written >= self._version:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self._version, fut))
        self._ensure_background()
        self._wake.set()
        await fut

    async def _flush_loop(self) -> None:
        while True:
            stop_if_cancelled()
            try:
                await self._flush_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the writer die: the next round retries
                logger.exception("the snapshot writer failed")
                await asyncio.sleep(self.config.advanced.snapshot_interval_s)

    async def _flush_once(self) -> None:
        """Wait for a waiter or the interval, write the books if they changed, wake whoever waited for them."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.config.advanced.snapshot_interval_s)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()
        if self._written < self._version:
            with self._lock:
                snap, version = self._snapshot(), self._version
            try:
                await asyncio.to_thread(self.store.save, snap)
                self._written = max(self._written, version)
            except Exception as exc:
                logger.exception("writing the books failed")
                for _, fut in self._waiters:
                    if not fut.done():
                        fut.set_exception(ClearError(f"the books could not be written: {type(exc).__name__}"))
                self._waiters = []
                return
        done = [(v, f) for v, f in self._waiters if v <= self._written]
        self._waiters = [(v, f) for v, f in self._waiters if v > self._written]
        for _, fut in done:
            if not fut.done():
                fut.set_result(None)
        if self._waiters:
            self._wake.set()

    def _check(self) -> None:
        st = self.ledger.state()
        if not st.invariant_holds:  # never expected: the ledger refuses such commands
            raise ClearError(f"budget invariant broken: reserved {st.reserved} + spent {st.spent} > {st.granted}")

    def _publish(self, state=None) -> None:
        state = state or self.ledger.state()
        self.metrics.observe_state(state, self.market.last_price, self.market.abandonment_rate(),
                                   self.market.last_reservation_price)

    # -- Serve entry points (async: applied one at a time on the replica's loop) --

    def _apply_model(self, model) -> None:
        """A learned length model: its histograms are priced from the next request on (the bins keep their
        meaning across versions, so the pricing window's rows stay valid)."""
        with self._lock:
            if self.calibration is not None:
                if len(model.calibration.centres) != len(self.calibration.centres):
                    raise ValueError("a length model with other bins than the allocator's")
                self.calibration = model.calibration
                self.market.lengths = self.market.market.check_lengths(model.calibration.histograms)
            self.model_version = model.version

    def _ensure_background(self) -> None:
        loop = asyncio.get_running_loop()
        if self.follower is not None:
            self.follower.start()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        if self.store is not None and self._flusher is None:
            self._wake = asyncio.Event()
            self._flusher = loop.create_task(self._flush_loop())

    async def _sweep(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self.config.advanced.sweep_interval_s)
            try:
                self.expire_sync()
            except Exception:
                logger.exception("reservation sweep failed")

    async def reserve(
        self, rid: str, threshold_tokens: float, log_sigma: float = 0.0, client_cap_tokens: int | None = None,
        owner: str | None = None, arrival_key: str | None = None, retry: bool = False, runaway: float = 0.0,
        tenant: str = DEFAULT_TENANT, raw_threshold_tokens: float | None = None, group: int = 1,
        floor_tokens: int = 1,
    ) -> Decision:
        self._ensure_background()
        d = self.reserve_sync(rid, threshold_tokens, log_sigma, client_cap_tokens, owner, arrival_key, retry,
                              runaway, tenant, raw_threshold_tokens, group, floor_tokens)
        if d.admitted:  # a reservation a restart must not forget
            await self._durable()
        return d

    async def report(self, report: LeaseReport) -> LeaseReply:
        """An ingress replica's report (decisions at the ingress): answered with the new quote and lease."""
        self._ensure_background()
        reply, lent = self.report_sync(report)
        if lent:  # a grant a restart must not forget
            await self._durable()
        return reply

    async def settle(self, rid: str, generated: int, failed: bool = False) -> Settlement | None:
        self._ensure_background()
        settled = self.settle_sync(rid, generated, failed)
        if settled is not None:  # acknowledged only once written: a restart must not reopen it (the ingress
            await self._durable()  # stops retrying at the acknowledgement and renews its lease, so it would stay)
        return settled

    async def correct(self, rid: str, received: int) -> Settlement | None:
        self._ensure_background()
        s = self.correct_sync(rid, received)
        if s is not None:
            await self._durable()
        return s

    async def renew(self, owner: str) -> int:
        self._ensure_background()
        return self.renew_sync(owner)

    async def status(self) -> dict:
        self._ensure_background()
        return self.status_sync()

    async def check_health(self) -> None:
        """Serve's periodic health check: also starts the sweep and the writer of a replica restarted after
        the last request (its restored reservations must lapse though no command arrives)."""
        self._ensure_background()

    def __del__(self):
        """Serve calls this when the replica stops: end the sweep and writer loops (deployments.background)."""
        cancel_on_stop(getattr(self, "_sweeper", None))
        cancel_on_stop(getattr(self, "_flusher", None))
        if getattr(self, "follower", None) is not None:
            self.follower.stop()
