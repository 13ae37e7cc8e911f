"""Metric names of the CLEAR service and the ``ray.serve.metrics`` objects behind them.

The constants below are the names given to ``ray.serve.metrics``.
:data:`EXPORTED_NAMES` is what dashboards and alert rules must query. Found by
experiment (Ray 2.60, its OpenTelemetry exporter; scraped from the node's
metrics export port, ``ray.init(_metrics_export_port=...)`` /
``ray start --metrics-export-port``, 8080 under KubeRay):

* every name gets the ``ray_`` prefix;
* gauges keep their name: ``ray_clear_shadow_price``;
* counters get ``_total``: ``clear_requests`` -> ``ray_clear_requests_total``
  (a counter appears only after its first increment; Ray refuses increments <= 0);
* histograms export ``_bucket`` (with ``le``), ``_count`` and ``_sum``:
  ``ray_clear_clearing_latency_s_bucket``...;
* new values reach the endpoint within about 5-10 s (the reporting interval).

Example series: ``ray_clear_requests_total{application="clear",
deployment="Ingress",outcome="admitted",error_type="",replica="...",...}``.

Labels: every metric carries Serve's own ``application``, ``deployment``,
``replica`` labels (plus Ray's ``SessionName``, ``Version``...). Ours:
``outcome`` (admitted | abandoned | rejected | error) and ``error_type`` (the
stable error type, ``""`` when admitted) on ``clear_requests``; ``reason`` on
``clear_predictor_fallbacks`` (timeout | error | lookup_miss); ``policy`` on the
allocator's gauges.
"""

from __future__ import annotations

from functools import lru_cache

# -- gauges (allocator) ------------------------------------------------------
SHADOW_PRICE = "clear_shadow_price"  # clearing price of the latest decision
RESERVATION_PRICE = "clear_reservation_price"  # price of a token held reserved at the latest decision (0: caps fit)
ABANDONMENT_RATE = "clear_abandonment_rate"  # share abandoned over the recent decisions
BUDGET_AVAILABLE = "clear_budget_available_tokens"  # tokens a new cap may take now
BUDGET_RESERVED = "clear_budget_reserved_tokens"  # tokens held by in-flight requests
BUDGET_SPENT = "clear_budget_spent_tokens"  # tokens charged for ended requests
BUDGET_GRANTED = "clear_budget_granted_tokens"  # budget credited to the pool so far
IN_FLIGHT = "clear_inflight_reservations"  # open reservations
# -- gauges (learner) --------------------------------------------------------
LEARNER_MODEL_VERSION = "clear_learner_model_version"  # the length model in service (0: the head as shipped)
LEARNER_WINDOW = "clear_learner_window_observations"  # observations a refit reads
LEARNER_CENSORED_SHARE = "clear_learner_censored_share"  # of the window: lengths known only as lower bounds
LEARNER_CAP_COVERAGE = "clear_learner_cap_coverage"  # of the window's capped or finished: finished within the cap
LEARNER_HELDOUT_ERROR = "clear_learner_heldout_abs_log_error"  # mean |ln median - ln length|, held-out prompts, finished
LEARNER_HELDOUT_LL = "clear_learner_heldout_log_likelihood"  # last refit, per held-out observation, by model
# -- counters ----------------------------------------------------------------
TOKENS_ALLOCATED = "clear_tokens_allocated"  # caps reserved (allocator)
TOKENS_GENERATED = "clear_tokens_generated"  # tokens the engine generated (allocator, at settle)
TOKENS_REFUNDED = "clear_tokens_refunded"  # unused parts of caps (allocator, at settle)
RESERVATIONS_EXPIRED = "clear_reservations_expired"  # reservations never settled, charged in full
TOKENS_EXPIRED = "clear_tokens_expired"  # caps of the expired reservations (charged in full)
TOKENS_RECOVERED = "clear_tokens_recovered"  # caps of a dead ingress's reservations, back to the pool (part of refunded)
REQUESTS = "clear_requests"  # requests by outcome and error_type (ingress)
TENANT_REQUESTS = "clear_tenant_requests"  # new arrivals by tenant and outcome (admitted | abandoned), allocator
TENANT_TOKENS = "clear_tenant_tokens"  # tokens by tenant and kind (allocated | generated), allocator
PREDICTOR_FALLBACKS = "clear_predictor_fallbacks"  # requests capped from the fallback predictor
LEARNER_RECORDS = "clear_learner_records"  # settled requests the learner was sent, by how they ended (learner)
LEARNER_REFITS = "clear_learner_refits"  # refits by outcome: published | kept | rolled_back (learner)
EXPLORED_REQUESTS = "clear_explored_requests"  # insolvent requests served at a probe cap (learner, from records)
EXPLORED_TOKENS = "clear_explored_tokens"  # tokens the probes generated (learner, from records)
# -- histograms --------------------------------------------------------------
CLEARING_LATENCY = "clear_clearing_latency_s"  # one market clearing + reservation, seconds
PREDICTION_LATENCY = "clear_prediction_latency_s"  # one predictor call seen by the ingress, seconds

OUTCOMES = ("admitted", "abandoned", "rejected", "error")
LATENCY_BOUNDARIES_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]

_GAUGES = (SHADOW_PRICE, RESERVATION_PRICE, ABANDONMENT_RATE, BUDGET_AVAILABLE, BUDGET_RESERVED, BUDGET_SPENT, BUDGET_GRANTED, IN_FLIGHT)
_GAUGES += (LEARNER_MODEL_VERSION, LEARNER_WINDOW, LEARNER_CENSORED_SHARE, LEARNER_CAP_COVERAGE,
             LEARNER_HELDOUT_ERROR, LEARNER_HELDOUT_LL)
_COUNTERS = (TOKENS_ALLOCATED, TOKENS_GENERATED, TOKENS_REFUNDED, RESERVATIONS_EXPIRED, TOKENS_EXPIRED, TOKENS_RECOVERED,
             TENANT_REQUESTS, TENANT_TOKENS,
             REQUESTS, PREDICTOR_FALLBACKS, LEARNER_RECORDS, LEARNER_REFITS, EXPLORED_REQUESTS, EXPLORED_TOKENS)
_HISTOGRAMS = (CLEARING_LATENCY, PREDICTION_LATENCY)

#: name given to ray.serve.metrics -> series names on Ray's Prometheus endpoint.
EXPORTED_NAMES: dict[str, list[str]] = {
    **{g: [f"ray_{g}"] for g in _GAUGES},
    **{c: [f"ray_{c}_total"] for c in _COUNTERS},
    **{h: [f"ray_{h}_bucket", f"ray_{h}_count", f"ray_{h}_sum"] for h in _HISTOGRAMS},
}


@lru_cache(maxsize=None)
def gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.serve import metrics

    return metrics.Gauge(name, description=description, tag_keys=tag_keys)


@lru_cache(maxsize=None)
def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.serve import metrics

    return metrics.Counter(name, description=description, tag_keys=tag_keys)


@lru_cache(maxsize=None)
def histogram(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.serve import metrics

    return metrics.Histogram(name, description=description, boundaries=LATENCY_BOUNDARIES_S, tag_keys=tag_keys)


class AllocatorMetrics:
    """The allocator's gauges, token counters and clearing-latency histogram."""

    def __init__(self, policy: str):
        self.tags = {"policy": policy}
        keys = ("policy",)
        self.price = gauge(SHADOW_PRICE, "Shadow price of a token at the latest clearing", keys)
        self.reservation_price = gauge(RESERVATION_PRICE, "Price of a token held in an open cap at the latest clearing",
                                       keys)
        self.abandon = gauge(ABANDONMENT_RATE, "Share of recent requests abandoned", keys)
        self.available = gauge(BUDGET_AVAILABLE, "Tokens of budget available to new caps", keys)
        self.reserved = gauge(BUDGET_RESERVED, "Tokens reserved by in-flight requests", keys)
        self.spent = gauge(BUDGET_SPENT, "Tokens charged for ended requests", keys)
        self.granted = gauge(BUDGET_GRANTED, "Budget credited to the pool so far, tokens", keys)
        self.in_flight = gauge(IN_FLIGHT, "Open budget reservations", keys)
        self.allocated = counter(TOKENS_ALLOCATED, "Completion tokens reserved as caps", keys)
        self.generated = counter(TOKENS_GENERATED, "Completion tokens generated by the engines", keys)
        self.refunded = counter(TOKENS_REFUNDED, "Unused cap tokens given back when requests ended", keys)
        self.expired = counter(RESERVATIONS_EXPIRED, "Reservations never settled, charged in full", keys)
        self.expired_tokens = counter(TOKENS_EXPIRED, "Caps of expired reservations, charged in full", keys)
        self.recovered_tokens = counter(TOKENS_RECOVERED, "Caps of a dead ingress's reservations, given back", keys)
        self.clearing = histogram(CLEARING_LATENCY, "Market clearing and reservation time, seconds", keys)
        self.tenant_requests = counter(TENANT_REQUESTS, "New arrivals by tenant and outcome", ("policy", "tenant", "outcome"))
        self.tenant_tokens = counter(TENANT_TOKENS, "Tokens by tenant: caps allocated, tokens generated",
                                     ("policy", "tenant", "kind"))
        # counter -> the LedgerState total it follows
        self._books = ((self.allocated, "allocated_total"), (self.generated, "generated_total"),
                       (self.refunded, "refunded_total"), (self.expired, "expired_total"),
                       (self.expired_tokens, "expired_tokens_total"), (self.recovered_tokens, "recovered_tokens_total"))

    def count_change(self, before, after) -> None:
        """Advance the token counters by what the books did between two ledger states."""
        for c, attr in self._books:
            delta = getattr(after, attr) - getattr(before, attr)
            if delta > 0:  # Ray counters refuse increments <= 0
                c.inc(float(delta), tags=self.tags)

    def count_books(self, state) -> None:
        """A restored replica: its counters start from the books' totals, so the series continue."""
        for c, attr in self._books:
            if getattr(state, attr) > 0:
                c.inc(float(getattr(state, attr)), tags=self.tags)

    def count_tenants(self, before: dict, after: dict) -> None:
        """Advance the per-tenant counters by what changed between two TenantStats snapshots."""
        for tenant, now in after.items():
            was = before.get(tenant, {})
            for field, metric, label in (("admitted", self.tenant_requests, ("outcome", "admitted")),
                                         ("abandoned", self.tenant_requests, ("outcome", "abandoned")),
                                         ("allocated_tokens", self.tenant_tokens, ("kind", "allocated")),
                                         ("generated_tokens", self.tenant_tokens, ("kind", "generated"))):
                delta = now[field] - was.get(field, 0)
                if delta > 0:
                    metric.inc(float(delta), tags={**self.tags, "tenant": tenant, label[0]: label[1]})

    def observe_state(self, state, price: float, abandonment_rate: float, reservation_price: float = 0.0) -> None:
        t = self.tags
        self.price.set(price, tags=t)
        self.reservation_price.set(reservation_price, tags=t)
        self.abandon.set(abandonment_rate, tags=t)
        self.available.set(state.available, tags=t)
        self.reserved.set(state.reserved, tags=t)
        self.spent.set(state.spent, tags=t)
        self.granted.set(state.granted, tags=t)
        self.in_flight.set(state.in_flight, tags=t)


class IngressMetrics:
    """Requests by outcome, predictor fallbacks (timeouts, errors) and prediction latency."""

    def __init__(self):
        self.requests = counter(REQUESTS, "Requests by outcome and error type", ("outcome", "error_type"))
        self.fallbacks = counter(PREDICTOR_FALLBACKS, "Requests capped from the fallback predictor", ("reason",))
        self.prediction = histogram(PREDICTION_LATENCY, "Predictor call latency seen by the ingress, seconds")

    def request(self, outcome: str, error_type: str = "") -> None:
        self.requests.inc(1.0, tags={"outcome": outcome, "error_type": error_type})

    def fallback(self, reason: str, n: int = 1) -> None:
        self.fallbacks.inc(float(n), tags={"reason": reason})


class LearnerMetrics:
    """The length learner's model version, window, held-out scores, refits and exploration."""

    def __init__(self):
        self.version = gauge(LEARNER_MODEL_VERSION, "Version of the length model in service (0: as shipped)")
        self.window = gauge(LEARNER_WINDOW, "Observations the next refit reads")
        self.censored = gauge(LEARNER_CENSORED_SHARE, "Share of the window whose length is only a lower bound")
        self.coverage = gauge(LEARNER_CAP_COVERAGE, "Share of the window's requests that finished within their cap")
        self.error = gauge(LEARNER_HELDOUT_ERROR, "Mean absolute log error of the served median on held-out prompts' finished requests")
        self.loglik = gauge(LEARNER_HELDOUT_LL, "Held-out log-likelihood per observation at the last refit",
                            ("model",))
        self.records = counter(LEARNER_RECORDS, "Settled requests the learner was sent, by how they ended", ("ended",))
        self.refits = counter(LEARNER_REFITS, "Refits of the length model by outcome", ("outcome",))
        self.explored = counter(EXPLORED_REQUESTS, "Insolvent requests served at a probe cap")
        self.explored_tokens = counter(EXPLORED_TOKENS, "Tokens generated by the probes")

    def observed(self, records) -> None:
        ended: dict[str, int] = {}
        for r in records:
            ended[r.ended] = ended.get(r.ended, 0) + 1
            if r.explored:
                self.explored.inc(1.0)
                if r.tokens > 0:
                    self.explored_tokens.inc(float(r.tokens))
        for how, n in ended.items():
            self.records.inc(float(n), tags={"ended": how})

    def refitted(self, report) -> None:
        self.refits.inc(1.0, tags={"outcome": report.outcome})
        for model, value in report.heldout_log_likelihood.items():
            if value == value:  # not NaN
                self.loglik.set(float(value), tags={"model": model})

    def observe(self, status: dict) -> None:
        self.version.set(float(status["model_version"]))
        self.window.set(float(status["window"]))
        self.censored.set(float(status["censored_share"]))
        for g, key in ((self.coverage, "cap_coverage"), (self.error, "heldout_abs_log_error")):
            if status[key] is not None:  # null: nothing to measure it on yet
                g.set(float(status[key]))
