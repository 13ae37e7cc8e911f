"""Tenant books: what each tenant's requests got from the market.

A request belongs to a tenant, whose weight in the utility is the paper's
alpha_i (Eq. 2): at one shadow price a heavier tenant's requests stay
solvent longer (docs/concepts.md, "Tenant weights"). The books count, per
tenant, the requests admitted and abandoned and the tokens they were
allocated, generated and charged (:class:`TenantStats`).

Both deciders keep a :class:`TenantBooks`: the allocator's
:class:`~clear_core.online_market.OnlineMarket` and each ingress replica's
:class:`~clear_core.lease.IngressMarket`. A replica reports its books
cumulatively; the allocator adds what changed since the owner's last report
(:meth:`TenantBooks.absorb`), so a report may be repeated or lost without
counting twice.

The books are bounded, since tenant names and request ids come from clients:
at most :data:`MAX_TENANTS` tenants are counted by name (in the allocator's
books the configured ones always) and the rest together as
:data:`OTHER_TENANT`; a request's tenant is remembered until it settles,
for the :data:`TENANT_MEMORY` most recent requests.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from clear_core.errors import InvalidInputError
from clear_core.ledger import Settlement

#: Requests whose tenant is remembered until they settle (older ones are forgotten first).
TENANT_MEMORY = 65536
DEFAULT_TENANT = "default"
#: Tenants counted by name (configured ones always, where their books open at once); the rest are counted
#: together as OTHER_TENANT.
MAX_TENANTS = 256
OTHER_TENANT = "other"
#: The counters of a tenant that replicas report cumulatively (TenantStats).
TENANT_COUNTERS = ("admitted", "abandoned", "allocated_tokens", "generated_tokens", "charged_tokens")


@dataclass
class TenantStats:
    """What one tenant's requests got from the market (counters since the allocator started)."""

    weight: float = 1.0  # the tenant's weight in the utility
    admitted: int = 0  # requests admitted (new arrivals)
    abandoned: int = 0  # requests abandoned (new arrivals)
    allocated_tokens: int = 0  # caps reserved
    generated_tokens: int = 0  # tokens the engines generated for its settled requests
    charged_tokens: int = 0  # tokens its settled requests were charged (whole caps in a budget of caps)

    def as_dict(self) -> dict:
        return {"weight": self.weight, "admitted": self.admitted, "abandoned": self.abandoned,
                "allocated_tokens": self.allocated_tokens, "generated_tokens": self.generated_tokens,
                "charged_tokens": self.charged_tokens}


class TenantBooks:
    """Per-tenant counters, the tenant of each open request, and each owner's last report (module docstring).

    ``weights``: tenant -> weight in the utility (others weigh 1); each must be
    finite and > 0. ``count_configured``: open the configured tenants' books at
    once (the allocator lists them before their first request; a replica
    reports only the tenants it has seen).
    """

    def __init__(self, weights: dict | None = None, *, count_configured: bool = True):
        self.weights = dict(weights or {})
        for t, w in self.weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise InvalidInputError(f"tenant_weights[{t}]", w, "must be finite and > 0")
        self.tenants: dict[str, TenantStats] = (
            {t: TenantStats(float(w)) for t, w in self.weights.items()} if count_configured else {})
        self._tenant_of: OrderedDict[str, str] = OrderedDict()  # rid -> tenant, until it settles
        self._owners: dict[str, dict] = {}  # owner -> its last reported tenant counters (budget leases)

    def weight(self, tenant: str) -> float:
        return float(self.weights.get(tenant, 1.0))

    def stats(self, tenant: str) -> TenantStats:
        """The books of ``tenant`` (opened on first use; past MAX_TENANTS names, OTHER_TENANT's)."""
        if tenant not in self.tenants:
            if len(self.tenants) >= MAX_TENANTS:  # bounded: a client cannot grow the books with new names
                tenant = OTHER_TENANT
            self.tenants.setdefault(tenant, TenantStats(self.weight(tenant)))
        return self.tenants[tenant]

    # -- one request ---------------------------------------------------------------

    def admitted(self, rid: str, tenant: str, cap: int, *, new_arrival: bool) -> None:
        """``rid`` reserved ``cap`` tokens; a retry is not counted as a new admission."""
        stats = self.stats(tenant)
        stats.allocated_tokens += int(cap)
        self._tenant_of[rid] = tenant
        while len(self._tenant_of) > TENANT_MEMORY:
            self._tenant_of.popitem(last=False)
        if new_arrival:
            stats.admitted += 1

    def abandoned(self, tenant: str) -> None:
        """A new arrival of ``tenant`` was abandoned."""
        self.stats(tenant).abandoned += 1

    def settled(self, rid: str, settlement: Settlement | None) -> None:
        """``rid`` ended (``settlement`` None: it held no reservation); its tenant is forgotten."""
        tenant = self._tenant_of.pop(rid, None)
        if settlement is not None and tenant is not None:
            stats = self.stats(tenant)
            stats.generated_tokens += int(settlement.generated)
            stats.charged_tokens += int(settlement.charged)

    # -- reports of other owners (budget leases) ---------------------------------------

    def absorb(self, owner: str, counters: dict) -> list[tuple[int, int]]:
        """An owner's cumulative per-tenant counters: the change since its last report is added.
        Returns the new (admissions, abandonments) it reports, per tenant in the report's order."""
        last = self._owners.setdefault(owner, {})
        news = []
        for tenant, values in list(counters.items())[:MAX_TENANTS]:
            new = {k: int(values.get(k, 0)) for k in TENANT_COUNTERS}
            old = last.get(tenant, {})
            st = self.stats(str(tenant))
            delta = {k: max(v - old.get(k, 0), 0) for k, v in new.items()}
            for k, v in delta.items():
                setattr(st, k, getattr(st, k) + v)
            news.append((delta["admitted"], delta["abandoned"]))
            last[tenant] = new
        return news

    def owners(self) -> list[str]:
        """Owners whose reports were absorbed (and not forgotten)."""
        return list(self._owners)

    def forget_owner(self, owner: str) -> None:
        self._owners.pop(owner, None)

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self) -> dict:
        """tenant -> its counters (:meth:`TenantStats.as_dict`)."""
        return {t: s.as_dict() for t, s in self.tenants.items()}

    def owner_snapshot(self) -> dict:
        """owner -> its last reported counters (a copy)."""
        return {o: {t: dict(v) for t, v in d.items()} for o, d in self._owners.items()}

    def restore(self, tenants: dict, owners: dict) -> None:
        """Counters of a :meth:`snapshot` and an :meth:`owner_snapshot` (weights stay the configured ones)."""
        for t, d in tenants.items():
            st = self.stats(t)
            st.admitted, st.abandoned = int(d.get("admitted", 0)), int(d.get("abandoned", 0))
            st.allocated_tokens = int(d.get("allocated_tokens", 0))
            st.generated_tokens = int(d.get("generated_tokens", 0))
            st.charged_tokens = int(d.get("charged_tokens", st.generated_tokens))
        self._owners = {o: {t: dict(v) for t, v in d.items()} for o, d in owners.items()}
