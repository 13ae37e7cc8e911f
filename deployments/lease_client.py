"""An ingress replica's decisions from a price quote and a budget lease (``allocator.decisions: ingress``).

The pure logic is :class:`clear_core.lease.IngressMarket`; this wraps it for
one ingress replica:

* a background loop reports to the allocator every
  ``allocator.advanced.report_interval_s`` (:meth:`deployments.allocator.Allocator.report`):
  the lease's counters, the new arrivals, the tenants' counters; the answer
  brings the new price quote and the lease's new size. This is the price
  broadcast: a short poll, so a price change reaches every replica within one
  interval plus a round trip (``quote_age_s`` in the status says how old the
  quote a replica acts on is);
* a request is priced from the quote it holds and reserved against the lease,
  with no call to the allocator, except when its cap does not fit the lease:
  then the replica reports at once and asks for more (one round trip);
* settles are local (the refund stays in the lease) and reach the allocator
  with the next report.

If the allocator is unreachable the replica goes on deciding from its lease
and its last quote until the lease runs out; a replica that has no quote yet
answers 503. If the allocator revoked the lease (the replica was cut off for
longer than the lease TTL, so its tokens went back to the pool), the replica
opens a new lease under a new owner name; the caps still open in the old one
settle locally and are not charged again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections import deque

import numpy as np

from clear_core.calibration import Calibration
from clear_core.errors import InvalidInputError
from clear_core.lease import IngressMarket, LeaseReply
from clear_core.servable import servable_policy
from deployments.background import cancel_on_stop, stop_if_cancelled
from deployments.config import length_calibration
from deployments.errors import AllocatorUnavailableError
from deployments.messages import Decision, Prediction

logger = logging.getLogger("ray.serve")

#: How long a request waits for the allocator's answer when it needs one (first quote, a lease top-up), s.
SYNC_TIMEOUT_S = 5.0
#: A stopping replica retries its last report this long, every LAST_REPORT_RETRY_S, while the allocator is away.
LAST_REPORT_FOR_S = 10.0
LAST_REPORT_RETRY_S = 0.5
#: Recent decisions whose quote age the status reports.
QUOTE_AGE_SAMPLES = 4096


def new_owner() -> str:
    return f"ingress-{uuid.uuid4().hex[:12]}"


class LeaseClient:
    def __init__(self, config, allocator, refund_unused: bool, learner=None):
        """``learner``: the length learner's handle; the histograms this replica prices with follow its model
        (``config.exploration()`` probes would-be-abandoned requests while the service learns)."""
        acfg = config.allocator
        self.config = acfg
        self.allocator = allocator
        self._policy = servable_policy(acfg.policy)
        # clear-cost-emp: the same calibration as the allocator's (build_app's), so that a bin index means
        # the same histogram on both sides; a request is priced on its raw prediction's bin.
        self.calibration = None
        if self._policy.prices_length_histograms:
            self.calibration = Calibration.from_dict(length_calibration(config.predictor, True))
        self._market_args = dict(refund_unused=refund_unused, context_limit_tokens=config.max_completion_tokens,
                                 lease_block_tokens=acfg.advanced.lease_block_tokens, tenant_weights=dict(acfg.tenant_weights),
                                 lengths=self.calibration.histograms if self.calibration is not None else (),
                                 exploration=config.exploration() if learner is not None else None)
        self.market = IngressMarket(self._policy, new_owner(), **self._market_args)
        self.model_version = 0
        self.follower = None
        if learner is not None:
            from deployments.learner_client import ModelFollower

            self.follower = ModelFollower(learner, config.learner.advanced.poll_s, self._apply_model)
        self._sync_lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None
        self.last_reported = False  # the stopping replica's last report was sent (last_report)
        self.last_reply: LeaseReply | None = None
        self.last_reply_at = 0.0  # time.monotonic() of the last answer
        self.reports = 0
        self.failed_reports = 0
        # Age of the quote each recent decision acted on (now - its issue time; one host's monotonic clock), s.
        self.quote_ages: deque = deque(maxlen=QUOTE_AGE_SAMPLES)

    @property
    def owner(self) -> str:
        return self.market.owner

    # -- the request path ------------------------------------------------------------

    async def decide(self, rid: str, pred: Prediction, client_cap: int, arrival_key: str, retry: bool,
                     tenant: str, group: int = 1, floor_tokens: int = 1) -> Decision:
        self._ensure_loop()
        if self.market.quote is None:
            await self.sync(required=True)
        now = time.monotonic()
        tau, length_bin = float(pred.threshold_tokens), None
        if self.calibration is not None:  # priced on the histogram of the raw prediction's bin (as centrally)
            raw = getattr(pred, "raw_threshold_tokens", None)
            tau = float(tau if raw is None else raw)
            length_bin = int(self.calibration.bin_of([tau])[0])
        ask = self.market.price(tau, log_sigma=pred.log_sigma, runaway=float(pred.runaway),
                                tenant=tenant, client_cap_tokens=int(client_cap), arrival_key=arrival_key,
                                retry=retry, now=now, length_bin=length_bin, group=group,
                                floor_tokens=floor_tokens)
        self.quote_ages.append(now - ask.quote.issued_at)
        refill = math.inf
        short = self.market.shortfall(ask)
        if short:
            try:
                reply = await self.sync(extra_tokens=short, required=True)
                refill = reply.refill_s
            except AllocatorUnavailableError:
                pass  # decided from what the lease holds: cut, or abandoned as pool-empty
        return self.market.admit(ask, rid, refill_s=refill)

    def settle(self, rid: str, tokens: int, failed: bool = False) -> None:
        self.market.settle(rid, int(tokens), failed=bool(failed))

    # -- reports ---------------------------------------------------------------------

    async def sync(self, extra_tokens: int = 0, required: bool = False) -> LeaseReply | None:
        """Report and take the answer (one at a time). ``required``: the caller cannot go on without it
        (503 if the allocator does not answer in time)."""
        async with self._sync_lock:
            report = self.market.report(extra_tokens=extra_tokens)
            try:
                reply = await asyncio.wait_for(_call(self.allocator.report.remote(report)), SYNC_TIMEOUT_S)
            except Exception as exc:
                self.failed_reports += 1
                if required:
                    logger.warning("lease report of %s failed: %s", self.owner, type(exc).__name__)
                    raise AllocatorUnavailableError("the allocator is unavailable (restarting); nothing was "
                                                    "charged, retry shortly") from None
                logger.info("lease report of %s failed: %s", self.owner, type(exc).__name__)
                return None
            if reply.revoked:
                self._reopen()
                return None if not required else await self._resync(extra_tokens)
            try:
                self.market.apply(reply)
            except InvalidInputError:
                return None
            self.reports += 1
            self.last_reply, self.last_reply_at = reply, time.monotonic()
            return reply

    async def _resync(self, extra_tokens: int) -> LeaseReply:
        """The first report of a reopened lease (the caller needs its answer)."""
        report = self.market.report(extra_tokens=extra_tokens)
        try:
            reply = await asyncio.wait_for(_call(self.allocator.report.remote(report)), SYNC_TIMEOUT_S)
            self.market.apply(reply)
        except Exception:
            self.failed_reports += 1
            raise AllocatorUnavailableError("the allocator is unavailable (restarting); nothing was charged, "
                                            "retry shortly") from None
        self.last_reply, self.last_reply_at = reply, time.monotonic()
        return reply

    def _apply_model(self, model) -> None:
        """A learned length model: its histograms price this replica's next request (same bins as before)."""
        if self.calibration is not None:
            if len(model.calibration.centres) != len(self.calibration.centres):
                raise ValueError("a length model with other bins than this replica's")
            self.calibration = model.calibration
            self._market_args["lengths"] = model.calibration.histograms
            self.market.lengths = model.calibration.histograms
        self.model_version = model.version

    def _reopen(self) -> None:
        old = self.market
        logger.warning("lease of %s was revoked by the allocator; %d caps still open in it are settled locally",
                       old.owner, old.lease.open_reservations())
        self.market = IngressMarket(self._policy, new_owner(), **self._market_args)
        self.market.quote = old.quote

    def _ensure_loop(self) -> None:
        if self.follower is not None:
            self.follower.start()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._report_loop(),
                                                                     context=contextvars.Context())

    async def _report_loop(self) -> None:
        while True:
            stop_if_cancelled()
            await asyncio.sleep(self.config.advanced.report_interval_s)
            try:
                await self.sync()
            except Exception:
                logger.exception("lease report loop")

    def status(self) -> dict:
        q = self.market.quote
        return {
            "owner": self.owner, "lease_held_tokens": self.market.lease.held,
            "lease_available_tokens": self.market.lease.available, "lease_reserved_tokens": self.market.lease.reserved,
            "lease_target_tokens": self.market.lease_target_tokens, "open_reservations": self.market.lease.open_reservations(),
            "quote_version": q.version if q else None, "shadow_price": q.shadow_price if q else None,
            "quote_age_s": time.monotonic() - self.last_reply_at if self.last_reply else None,
            "reports": self.reports, "failed_reports": self.failed_reports,
            "decision_quote_age_s": _percentiles(self.quote_ages),
        }

    async def last_report(self) -> None:
        """Report once more (a replica that stops): the charges since the last report reach the books. Once."""
        if self.last_reported:
            return
        self.last_reported = True
        deadline = time.monotonic() + LAST_REPORT_FOR_S
        while True:  # retried while the allocator is away (a rolling update replaces it at the same time)
            failed = self.failed_reports
            await self.sync()
            if self.failed_reports == failed or time.monotonic() > deadline:  # answered (or revoked), or given up
                return
            await asyncio.sleep(LAST_REPORT_RETRY_S)

    def stop(self) -> None:
        cancel_on_stop(self._loop_task)
        if self.follower is not None:
            self.follower.stop()


def _percentiles(xs) -> dict | None:
    if not xs:
        return None
    a = np.asarray(xs, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "n": int(a.size)}


async def _call(resp):
    return await resp
