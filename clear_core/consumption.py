"""A market on *expected generated tokens*: what a cap really costs (the ``clear-cost`` policy).

The paper's market (and ``clear``) charges a query its whole cap. An engine
generates ``min(D, c)`` tokens for a query of true length ``D`` under cap
``c`` and the rest of the cap is refunded, so what an operator pays for is
the *expected consumption* of the cap. Here each query's true length is
log-normal around its predicted threshold,
``D = tau exp(sigma Z)``, ``Z ~ N(0, 1)`` (``tau`` the calibrated median,
``sigma`` its own calibrated spread, :mod:`clear_core.calibration`), and with
``c = tau exp(sigma u)``:

    value   v Phi(u)                     probability of finishing, times the
                                         query's weight v (tenant weight, Eq. 2's alpha_i)
    cost    tau M(u),  M(u) = exp(sigma^2/2) Phi(u - sigma) + exp(sigma u) (1 - Phi(u))
                                         = E[min(D, c)] / tau

The market clears a budget ``B`` of expected generated tokens: one shadow
price ``lam`` per expected token, and each query maximises
``v Phi(u) - lam tau M(u)``. Since ``dM/du = sigma exp(sigma u) (1 - Phi(u))``,
the first-order condition is

    R(u) = ln r(u) - sigma u = ln kappa,   kappa = lam sigma tau / v,

with ``r(u) = phi(u) / (1 - Phi(u))`` the inverse Mills ratio: the *hazard* of
finishing must equal the price. ``R`` rises to a peak at ``u_peak(sigma)``
(where ``r(u) - u = sigma``) and falls after it; the optimum is on the falling
branch (the second-order condition), so the cap is ``u*(ln kappa)``, decreasing
in ``kappa``. The surplus per unit of value, ``Phi(u*) - (kappa / sigma) M(u*)``,
depends on ``(kappa, sigma)`` only and falls with ``kappa`` (envelope
theorem), so a query is solvent iff ``ln kappa < x0(sigma)``: rational
abandonment, as in the paper, but of queries whose *expected cost* does not pay
back their chance of finishing. A cap cut at the context limit ``t_max``
(``u <= u_max = ln(t_max / tau) / sigma``) keeps the surplus check at ``u_max``.

Unlike the cap market, expected consumption stops growing once a cap is far
in the tail (``M(u) -> exp(sigma^2/2)``, the mean), so the optimum runs far
into the tail. A cap is reserved whole, though, and long sequences hold a
batch: under scarcity a cap covers at most :data:`COVERAGE_QUANTILE` of the
query's finishing length; when the whole budget is abundant (every query at the
context limit fits) every query gets the context limit.

Solver (exact on a rounded instance)
------------------------------------
Demand ``D(ln lam) = sum_i tau_i M(u_i)`` is non-increasing in the price, with
jumps where queries turn insolvent. Every query's cost depends on
``(sigma_i, ln(tau_i sigma_i / v_i))`` and its context limit only, so:

1. ``sigma`` is rounded to a log grid (relative step :data:`SIGMA_GRID_STEP`)
   and ``ln tau`` to steps of :data:`LOG_TAU_STEP`; queries with equal rounded
   ``(sigma, tau, v)`` are one *type* (one ``O(N)`` pass with ``bincount``, no
   sort). The rounding moves a threshold by at most 0.2% and a spread by at
   most 1%, far below any predictor's error; the market is then solved exactly
   for the rounded instance.
2. For each ``sigma`` on the grid, ``u*`` and ``M(u*)`` are tabulated once on a
   uniform grid of ``ln kappa`` (cached for the process): ``R`` is evaluated
   on a dense ``u`` grid, inverted by interpolation and polished by Newton
   steps, so a price probe is a table lookup per type, ``O(T)``.
3. The clearing price is the boundary of ``D(ln lam) > B`` on ``ln lam``,
   found by a safeguarded secant/bisection (:func:`clear_core.numerics.secant_bisect`) to
   :data:`LOG_PRICE_TOLERANCE`;
   the budget the last abandonment jump leaves unspent is shared among the
   solvent queries by lowering the price they see (nobody is admitted by it),
   as :func:`clear_core.uncertainty.clear_market_lognormal` does.

Equal queries (one type) turn insolvent together; the budget that jump leaves
is first offered to the marginal type's queries, as many as it covers in
arrival order (rationing within a tie), then shared among the solvent ones.
Caps are floored to whole tokens (:func:`clear_core.numerics.floor_caps`,
which only lowers the expected cost). ``benchmarks/clearing_speed.py``
compares its time with a sort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri

from clear_core.errors import InvalidInputError
from clear_core.market import validate_budget, validate_context_limit, validate_thresholds
from clear_core.numerics import floor_caps, secant_bisect

_LN_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
#: Spreads are rounded to a log grid of this relative step, and kept within these bounds.
SIGMA_GRID_STEP = 0.02
SIGMA_MIN = 0.05
SIGMA_MAX = 5.0
#: ln(threshold) is rounded to multiples of this (a relative error of at most 0.2%).
LOG_TAU_STEP = 1.0 / 256.0
#: Caps never exceed this many tokens when no context limit is given.
CAP_CEILING_TOKENS = float(2**24)
#: The coverage grid never goes past u = this (1 - Phi(u) is below 1e-300 there).
U_CEILING = 37.0
#: Step and span of the ln(kappa) tables, and dense points per unit of u used to invert R.
LOG_KAPPA_SPAN = 40.0
LOG_KAPPA_STEP = 1.0 / 256.0
_U_POINTS_PER_UNIT = 64
#: A cap covers at most this quantile of a query's finishing length (u <= Phi^-1 of it): the tail past
#: it is worth almost nothing, but a cap is reserved whole and long sequences keep a batch busy.
COVERAGE_QUANTILE = 0.999
MAX_COVERAGE_U = float(ndtri(COVERAGE_QUANTILE))
#: Runaway probabilities are kept below this; their odds are rounded to a log grid above ETA_MIN.
MAX_RUNAWAY = 0.95
ETA_MIN = 1e-4
ETA_GRID_STEP = 0.05
#: Price search on ln(lam): stopping width and iteration cap.
LOG_PRICE_TOLERANCE = 1e-7
LOG_PRICE_ITERATIONS = 200


# --------------------------------------------------------------------------
# The per-query problem in normalised form (functions of u and sigma only)
# --------------------------------------------------------------------------


def log_mills(u):
    """ln r(u), r(u) = phi(u) / (1 - Phi(u)): the hazard of a standard normal, computed in logs."""
    u = np.asarray(u, dtype=float)
    return -0.5 * u * u - _LN_SQRT_2PI - log_ndtr(-u)


def _log_tail(u, eta: float):
    """ln(1 - Phi(u) + eta): the share still generating at coverage u (per unit of finishing mass)."""
    lt = log_ndtr(-np.asarray(u, dtype=float))
    if np.ndim(eta) == 0 and eta == 0.0:
        return lt
    with np.errstate(divide="ignore"):
        return np.logaddexp(lt, np.log(eta))


def hazard_index(u, sigma, eta=0.0):
    """R(u) = ln phi(u) - ln(1 - Phi(u) + eta) - sigma u: the first-order condition is R(u) = ln kappa."""
    u = np.asarray(u, dtype=float)
    return -0.5 * u * u - _LN_SQRT_2PI - _log_tail(u, eta) - sigma * u


def expected_cost(u, sigma, eta=0.0):
    """M(u) + eta exp(sigma u): E[min(D, c)] / (tau (1 - rho)) at coverage u (module docstring)."""
    u = np.asarray(u, dtype=float)
    m = np.exp(0.5 * sigma * sigma) * ndtr(u - sigma) + np.exp(sigma * u + log_ndtr(-u))
    return m + eta * np.exp(sigma * u)


def runaway_odds(runaway):
    """eta = rho / (1 - rho) for a runaway probability rho in [0, MAX_RUNAWAY]."""
    rho = np.clip(np.asarray(runaway, dtype=float), 0.0, MAX_RUNAWAY)
    return rho / (1.0 - rho)


def finish_probability(caps, thresholds, sigmas, runaway=0.0):
    """P(D <= cap) = (1 - rho) Phi(ln(cap / tau) / sigma) per query (0 where the cap is 0)."""
    caps = np.asarray(caps, dtype=float)
    rho = np.clip(np.asarray(runaway, dtype=float), 0.0, MAX_RUNAWAY)
    with np.errstate(divide="ignore"):
        p = ndtr(np.log(np.maximum(caps, 1e-300) / thresholds) / sigmas)
    return np.where(caps > 0, (1.0 - rho) * p, 0.0)


def expected_generated(caps, thresholds, sigmas, runaway=0.0):
    """E[min(D, cap)] per query under the model (0 where the cap is 0)."""
    caps = np.asarray(caps, dtype=float)
    tau = np.asarray(thresholds, dtype=float)
    sig = np.broadcast_to(np.asarray(sigmas, dtype=float), tau.shape)
    rho = np.clip(np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape), 0.0, MAX_RUNAWAY)
    with np.errstate(divide="ignore"):
        u = np.log(np.maximum(caps, 1e-300) / tau) / sig
    finishing = tau * (np.exp(0.5 * sig * sig) * ndtr(u - sig) + np.exp(sig * u + log_ndtr(-u)))
    return np.where(caps > 0, (1.0 - rho) * finishing + rho * caps, 0.0)


@lru_cache(maxsize=4096)
def coverage_peak(sigma: float, eta: float = 0.0) -> float:
    """u_peak: where R peaks, phi(u) / (1 - Phi(u) + eta) - u = sigma (the left side falls)."""

    def gap(u: float) -> float:
        return float(math.exp(-0.5 * u * u - _LN_SQRT_2PI - float(_log_tail(u, eta))) - u - sigma)

    return brentq(gap, -60.0, 1e4, xtol=1e-13)


def _surplus_on_branch(u: float, sigma: float, eta: float) -> float:
    """Surplus per unit value of the optimum whose coverage is u: Phi(u) - kappa(u)/sigma M(u)."""
    kappa = math.exp(float(hazard_index(u, sigma, eta)))
    return float(ndtr(u)) - kappa / sigma * float(expected_cost(u, sigma, eta))


@lru_cache(maxsize=4096)
def solvency_log_kappa(sigma: float, eta: float = 0.0) -> float:
    """x0: queries with ln kappa below it have positive surplus at their optimum."""
    peak, top = coverage_peak(sigma, eta), coverage_ceiling(sigma, eta)
    if _surplus_on_branch(peak, sigma, eta) >= 0.0:  # solvent up to the fold; beyond it no interior optimum
        return float(hazard_index(peak, sigma, eta))
    if _surplus_on_branch(top, sigma, eta) <= 0.0:
        # Narrow spreads: the optimum only pays once it is past the coverage ceiling, where every cap
        # is the context limit; solvency is then decided at the ceiling (the clipped regime).
        return float(hazard_index(top, sigma, eta))
    u0 = brentq(lambda u: _surplus_on_branch(u, sigma, eta), peak, top, xtol=1e-13)
    return float(hazard_index(u0, sigma, eta))


def coverage_ceiling(sigma: float, eta: float = 0.0) -> float:
    """The largest coverage any cap can need: ln(CAP_CEILING) / sigma, within U_CEILING, past the peak."""
    return max(min(U_CEILING, math.log(CAP_CEILING_TOKENS) / sigma), coverage_peak(sigma, eta) + 1.0)


@dataclass(frozen=True)
class CoverageTable:
    """u*(x) and the cost at u*(x) on the grid x_k = x0 - k * LOG_KAPPA_STEP, for one (sigma, eta)."""

    sigma: float
    eta: float  # runaway odds rho / (1 - rho)
    x0: float  # ln kappa of solvency: the grid's top
    x_low: float  # R at the coverage ceiling: the grid's bottom
    coverage: np.ndarray  # u*(x_k)
    cost: np.ndarray  # M(u*(x_k)) + eta exp(sigma u*(x_k))


@lru_cache(maxsize=2048)
def coverage_table(sigma: float, eta: float = 0.0) -> CoverageTable:
    """Tabulate the optimal coverage on the falling branch of R for one (sigma, eta) (cached)."""
    x0 = solvency_log_kappa(sigma, eta)
    u_top = coverage_ceiling(sigma, eta)
    x_low = float(hazard_index(u_top, sigma, eta))
    peak = coverage_peak(sigma, eta)
    u = np.linspace(peak, u_top, int((u_top - peak) * _U_POINTS_PER_UNIT) + 2)
    r = hazard_index(u, sigma, eta)
    # With runaways R falls like -u^2/2: past LOG_KAPPA_SPAN below x0 (prices e^40 apart) caps are far
    # beyond any context limit, so the table stops there and its last coverage is the ceiling.
    x_low = max(x_low, x0 - LOG_KAPPA_SPAN)
    k = int(math.ceil((x0 - x_low) / LOG_KAPPA_STEP)) + 1
    x = x0 - LOG_KAPPA_STEP * np.arange(k)
    cov = np.interp(-x, -r, u)  # -R rises along u past the peak
    for _ in range(4):  # Newton on R(u) = x: R'(u) = phi / (1 - Phi + eta) - u - sigma (< 0 past the peak)
        slope = np.exp(-0.5 * cov * cov - _LN_SQRT_2PI - _log_tail(cov, eta)) - cov - sigma
        step = (hazard_index(cov, sigma, eta) - x) / np.minimum(slope, -1e-12)
        cov = np.clip(cov - step, peak, u_top)
    return CoverageTable(sigma, eta, x0, float(x[-1]), cov, expected_cost(cov, sigma, eta))


def sigma_grid_index(sigmas: np.ndarray) -> np.ndarray:
    """Index of each spread on the log grid sigma_j = SIGMA_MIN (1 + SIGMA_GRID_STEP)^j."""
    s = np.clip(sigmas, SIGMA_MIN, SIGMA_MAX)
    return np.rint(np.log(s / SIGMA_MIN) / math.log1p(SIGMA_GRID_STEP)).astype(np.int64)


def sigma_of_index(j: int) -> float:
    return SIGMA_MIN * (1.0 + SIGMA_GRID_STEP) ** int(j)


def eta_grid_index(eta: np.ndarray) -> np.ndarray:
    """Index of runaway odds on the grid: 0 for none, j >= 1 for ETA_MIN (1 + ETA_GRID_STEP)^(j - 1)."""
    e = np.asarray(eta, dtype=float)
    j = np.rint(np.log(np.maximum(e, ETA_MIN) / ETA_MIN) / math.log1p(ETA_GRID_STEP)).astype(np.int64) + 1
    return np.where(e < ETA_MIN / 2, 0, j)


def eta_of_index(j: int) -> float:
    return 0.0 if j == 0 else ETA_MIN * (1.0 + ETA_GRID_STEP) ** (int(j) - 1)


# --------------------------------------------------------------------------
# The market on types
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsumptionResult:
    """Outcome of :func:`clear_consumption_market`."""

    caps: np.ndarray  # query -> integer completion cap in tokens (0 = abandoned)
    shadow_price: float  # lam*: value per expected generated token at the clearing
    active: np.ndarray  # query -> solvent at the clearing price
    expected_generated_tokens: float  # sum of E[min(D, cap)] over the queries, tokens
    budget: float  # the budget of expected generated tokens that was cleared
    iterations: int  # demand probes of the price searches
    converged: bool  # the price search met LOG_PRICE_TOLERANCE
    n_types: int  # distinct (sigma, runaway, threshold, weight) after rounding
    # The quote that reproduces these caps query by query (caps_at_log_prices): ln of the solvency price
    # and of the (lower) price the solvent queries' caps are set at; -inf: no price (caps clipped);
    # full_context: abundant, every query at the context limit.
    log_price: float = -math.inf
    log_fill_price: float = -math.inf
    full_context: bool = False
    # The price of a token held in a reservation (clear-cost-emp with a cap budget; 0: the caps fit), and
    # the share theta of the clearing's price on the combined cost that is on a reserved token (caps that
    # fit at a vanishing price still have one, as the cost they were chosen on).
    reservation_price: float = 0.0
    reservation_share: float = 0.0

    @property
    def abandonment_rate(self) -> float:
        return float((~self.active).mean()) if self.active.size else 0.0


#: Table ids combine the sigma and runaway-odds grid indices: sigma index * _ETA_LEVELS + eta index.
_ETA_LEVELS = 1024


@dataclass(frozen=True)
class _Types:
    """Queries grouped by rounded (sigma, runaway odds, threshold, weight); one row per type."""

    inverse: np.ndarray  # query -> type
    count: np.ndarray  # type -> queries
    tau: np.ndarray  # type -> rounded threshold, tokens
    sigma: np.ndarray  # type -> rounded spread
    eta: np.ndarray  # type -> rounded runaway odds rho / (1 - rho)
    table: np.ndarray  # type -> coverage table id
    weight: np.ndarray  # type -> value weight v


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, code of each) without sorting all N when there are few distinct values.

    Weights come from a handful of tenants: the distinct values of a sample are
    looked up with a binary search, O(N log K); if the sample missed one, fall
    back to np.unique (a sort).
    """
    if values.size and (values == values.flat[0]).all():
        return values[:1].copy(), np.zeros(values.size, dtype=np.int64)
    step = max(1, values.size // 4096)
    cand = np.unique(values[::step])
    code = np.minimum(np.searchsorted(cand, values), cand.size - 1)
    if (cand[code] == values).all():
        return cand, code
    vals, code = np.unique(values, return_inverse=True)
    return vals, code


def _group(tau: np.ndarray, sigma: np.ndarray, eta: np.ndarray, weight: np.ndarray) -> _Types:
    table_ids, tcode = _codes(sigma_grid_index(sigma) * _ETA_LEVELS + np.minimum(eta_grid_index(eta), _ETA_LEVELS - 1))
    ltau = np.rint(np.log(tau) / LOG_TAU_STEP).astype(np.int64)
    wvals, wcode = _codes(weight)
    tmin = int(ltau.min())
    nl, nt = int(table_ids.size), int(ltau.max()) - tmin + 1
    key = ((wcode.astype(np.int64) * nl + tcode) * nt) + (ltau - tmin)
    space = int(wvals.size) * nl * nt
    if space <= 4 * key.size + 65536:  # a dense histogram: O(N), no sort
        count_all = np.bincount(key, minlength=space)
        present = np.flatnonzero(count_all)
        lut = np.full(space, -1, dtype=np.int64)
        lut[present] = np.arange(present.size)
        inverse, count, keys = lut[key], count_all[present], present
    else:  # spread too thin for a histogram: group by sorting
        keys, inverse, count = np.unique(key, return_inverse=True, return_counts=True)
    t_idx = keys % nt
    rest = keys // nt
    tb = table_ids[rest % nl]
    wc = rest // nl
    return _Types(
        inverse=inverse,
        count=count.astype(float),
        tau=np.exp((t_idx + tmin) * LOG_TAU_STEP),
        sigma=SIGMA_MIN * (1.0 + SIGMA_GRID_STEP) ** (tb // _ETA_LEVELS),
        eta=np.array([eta_of_index(int(j)) for j in tb % _ETA_LEVELS]) if tb.size < 4096 else
        np.where(tb % _ETA_LEVELS == 0, 0.0, ETA_MIN * (1.0 + ETA_GRID_STEP) ** (tb % _ETA_LEVELS - 1)),
        table=tb,
        weight=wvals[wc],
    )


class _Demand:
    """Expected demand of the types at a price, from the coverage tables (module docstring)."""

    def __init__(self, types: _Types, t_max: float):
        self.types = types
        ids, where = np.unique(types.table, return_inverse=True)
        tables = [coverage_table(sigma_of_index(int(j) // _ETA_LEVELS), eta_of_index(int(j) % _ETA_LEVELS))
                  for j in ids]
        sizes = np.array([t.coverage.size for t in tables])
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        self.offset = offsets[where]
        self.last = self.offset + sizes[where] - 1
        self.x0 = np.array([t.x0 for t in tables])[where]
        self.coverage = np.concatenate([t.coverage for t in tables])
        self.unit_cost = np.concatenate([t.cost for t in tables])
        tau, sig, eta = types.tau, types.sigma, types.eta
        self.a = np.log(tau * sig / types.weight)  # x = ln lam + a
        # Demand in real tokens: (1 - rho) tau per unit of the normalised cost.
        self.weight_tau = types.count * tau / (1.0 + eta)
        # The context limit (or the coverage ceiling) as a coverage: caps past it are clipped.
        u_top = np.array([t.coverage[-1] for t in tables])[where]
        limit = min(t_max, CAP_CEILING_TOKENS)
        u_limit = np.log(limit / tau) / sig
        # Caps never cover more than COVERAGE_QUANTILE of the finishing lengths: past it a cap buys
        # almost nothing in the model, but the ledger reserves it whole and the engine may run it.
        self.u_clip = np.minimum(np.minimum(u_limit, u_top), MAX_COVERAGE_U)
        peak = np.array([coverage_peak(t.sigma, t.eta) for t in tables])[where]
        # Clipped when the optimum would lie past u_clip, i.e. x < R(u_clip) on the falling branch;
        # a clip below the peak is always binding.
        self.x_clip = np.where(self.u_clip > peak, hazard_index(self.u_clip, sig, eta), np.inf)
        self.clip_cost = expected_cost(self.u_clip, sig, eta)
        # Solvency (monotone in the price): unclipped iff x < x0; clipped iff the surplus at u_clip
        # is positive, ln kappa < ln(sigma Phi(u_clip) / cost(u_clip)); which regime decides at the
        # margin depends on whether the clip binds before x0 (see the module docstring).
        with np.errstate(divide="ignore"):
            x_clipped_solvent = np.log(sig * ndtr(self.u_clip)) - np.log(self.clip_cost)
        self.l_solvent = np.where(self.x_clip < self.x0, self.x0, x_clipped_solvent) - self.a
        self.x_low = np.array([t.x_low for t in tables])[where]

    def _index(self, x: np.ndarray):
        f = (self.x0 - x) / LOG_KAPPA_STEP
        f = np.clip(f, 0.0, (self.last - self.offset).astype(float))
        k = np.maximum(np.minimum(f.astype(np.int64), self.last - self.offset - 1), 0)
        return self.offset + k, f - k

    def _lookup(self, table: np.ndarray, x: np.ndarray) -> np.ndarray:
        i, w = self._index(x)
        return table[i] * (1.0 - w) + table[np.minimum(i + 1, table.size - 1)] * w

    def per_type_cost(self, log_price: float, solvent: np.ndarray | None = None) -> np.ndarray:
        """Normalised expected cost of each type at ln lam = log_price (0 where insolvent)."""
        x = log_price + self.a
        if solvent is None:
            solvent = log_price < self.l_solvent
        clipped = x < self.x_clip
        g = np.where(clipped, self.clip_cost, self._lookup(self.unit_cost, np.maximum(x, self.x_clip)))
        return np.where(solvent, g, 0.0)

    def total(self, log_price: float, solvent: np.ndarray | None = None) -> float:
        return float(np.dot(self.weight_tau, self.per_type_cost(log_price, solvent)))

    def caps(self, log_price: float, solvent: np.ndarray, t_max: float) -> np.ndarray:
        """Real caps per type at ln lam = log_price (0 where not solvent)."""
        x = log_price + self.a
        clipped = x < self.x_clip
        u = self._lookup(self.coverage, np.maximum(x, self.x_clip))
        u = np.where(clipped, self.u_clip, np.minimum(u, self.u_clip))
        limit = min(t_max, CAP_CEILING_TOKENS)
        return np.where(solvent, np.minimum(self.types.tau * np.exp(self.types.sigma * u), limit), 0.0)

    def price_bracket(self) -> tuple[float, float]:
        """ln lam below which every type is clipped, and above which every type is insolvent."""
        finite = np.isfinite(self.x_clip)
        lo = float(np.min(np.where(finite, self.x_clip, self.x_low) - self.a)) - 1.0
        hi = float(np.max(self.l_solvent)) + 1e-9
        return lo, max(hi, lo + 1.0)


def log_price_boundary(over, lo: float, hi: float, f_lo: float, f_hi: float) -> tuple[float, int, bool]:
    """The price search on ln lam at this module's tolerances: the boundary of ``over(l) > 0``, ``over`` the
    signed excess of demand over the budget, ``f_lo > 0 >= f_hi`` (:func:`clear_core.numerics.secant_bisect`).
    Returns (hi, probes, converged): the lowest price found whose demand fits. (Also
    :mod:`clear_core.empirical_market`'s price search.)
    """
    r = secant_bisect(over, lo, hi, f_lo, f_hi, tolerance=LOG_PRICE_TOLERANCE, max_iterations=LOG_PRICE_ITERATIONS)
    return r.hi, r.iterations, r.converged


def _ration_marginal_type(demand: _Demand, solvent: np.ndarray, log_price: float, spare: float, t_max: float):
    """(type, how many, their cost, cap) of the marginal type's queries the spare budget covers, or None."""
    out = ~solvent & (demand.l_solvent <= log_price) & np.isfinite(demand.l_solvent)
    if spare < 1.0 or not out.any():
        return None
    m = int(np.flatnonzero(out)[np.argmax(demand.l_solvent[out])])
    at = demand.l_solvent[m] - 1e-9  # just below the price at which type m turns insolvent
    only = np.zeros_like(solvent)
    only[m] = True
    each = float(demand.per_type_cost(at, only)[m] * demand.types.tau[m] / (1.0 + demand.types.eta[m]))
    k = int(min(spare // each, demand.types.count[m])) if each > 0 else 0
    if k < 1:
        return None
    cap = int(floor_caps(demand.caps(at, only, t_max)[m]))
    return (m, k, k * each, cap) if cap > 0 else None


def clear_consumption_market(
    thresholds,
    budget,
    *,
    log_sigma,
    runaway=0.0,
    weights=None,
    context_limit_tokens: float | None = None,
    fill_unused: bool = True,
) -> ConsumptionResult:
    """Clear a budget of *expected generated tokens* (module docstring).

    Parameters
    ----------
    thresholds : each query's calibrated median length ``tau_i`` in tokens (>= 0; floored at 1).
    budget : expected generated tokens the caps may cost in total.
    log_sigma : the spread of each query's log length (scalar or one per query; > 0).
    runaway : each query's probability of never finishing (generating until its cap), in [0, 1).
    weights : each query's value weight ``v_i > 0`` (tenant weight); ``None``: all 1.
    context_limit_tokens : ``t_max``; no cap exceeds it.
    fill_unused : share the expected budget the last abandonment leaves unspent.
    """
    tau = np.maximum(validate_thresholds(thresholds), 1.0)
    b = validate_budget(budget)
    t_max = validate_context_limit(context_limit_tokens)
    sig = np.broadcast_to(np.asarray(log_sigma, dtype=float), tau.shape).astype(float)
    bad = ~np.isfinite(sig) | (sig <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(f"log_sigma[{i}]", float(sig[i]), "must be finite and > 0")
    w = np.ones_like(tau) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), tau.shape)
    bad = ~np.isfinite(w) | (w <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(f"weights[{i}]", float(w[i]), "must be finite and > 0")
    rho = np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape)
    bad = ~np.isfinite(rho) | (rho < 0) | (rho >= 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(f"runaway[{i}]", float(rho[i]), "must be in [0, 1)")
    n = tau.size
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ConsumptionResult(empty, 0.0, empty.astype(bool), 0.0, b, 0, True, 0)
    types = _group(tau, sig, runaway_odds(rho), np.asarray(w, dtype=float))
    demand = _Demand(types, t_max)
    lo, hi = demand.price_bracket()
    probes, converged = 0, True
    f_lo = demand.total(lo) - b
    if f_lo <= 0:  # abundant: every solvent query at its clipped cap
        log_price = lo
        price = 0.0
    else:
        f_hi = demand.total(hi) - b
        log_price, probes, converged = log_price_boundary(lambda l: demand.total(l) - b, lo, hi, f_lo, f_hi)
        price = math.exp(log_price)
    solvent = log_price < demand.l_solvent
    # Equal queries turn insolvent together; when the budget the jump left covers some of the
    # marginal type (the last to turn insolvent), admit as many of them as it covers, in order,
    # at their cap at the margin: rationing within a tie instead of abandoning all of it.
    share = _ration_marginal_type(demand, solvent, log_price, b - demand.total(log_price, solvent), t_max)
    spare = b - demand.total(log_price, solvent) - (share[2] if share else 0.0)
    log_fill = log_price
    if fill_unused and price > 0 and solvent.any() and spare >= 1.0:
        budget_left = b - (share[2] if share else 0.0)
        f_top = demand.total(lo, solvent) - budget_left
        if f_top <= 0:
            log_fill = lo
        else:
            log_fill, more, ok = log_price_boundary(lambda l: demand.total(l, solvent) - budget_left, lo, log_price,
                                           f_top, demand.total(log_price, solvent) - budget_left)
            probes, converged = probes + more, converged and ok
    real = demand.caps(log_fill, solvent, t_max)
    full_context = False
    if price == 0.0 and math.isfinite(t_max):
        # Abundant: if every query can have the context limit within the budget, it gets it (the
        # coverage ceiling saves reservations under scarcity, not when nothing is scarce).
        full = np.full(types.tau.size, float(t_max))
        rho_t = types.eta / (1.0 + types.eta)
        if float(np.dot(types.count, expected_generated(full, types.tau, types.sigma, rho_t))) <= b:
            real, full_context = full, True
    type_caps = floor_caps(real)
    caps = type_caps[types.inverse]
    if share:
        m, k, _, cap = share
        caps[np.flatnonzero(types.inverse == m)[:k]] = cap
    active = caps > 0
    # What the caps are expected to generate, under the rounded model the market cleared (per type).
    rho_t = types.eta / (1.0 + types.eta)
    expected = float(np.dot(types.count, expected_generated(type_caps, types.tau, types.sigma, rho_t)))
    if share:
        m, k, _, cap = share
        both = expected_generated([cap, type_caps[m]], types.tau[[m, m]], types.sigma[m], rho_t[m])
        expected += k * float(both[0] - both[1])
    return ConsumptionResult(
        caps=caps, shadow_price=float(price), active=active, expected_generated_tokens=expected, budget=b,
        iterations=probes, converged=bool(converged), n_types=int(types.count.size),
        log_price=log_price if price > 0 else -math.inf, log_fill_price=log_fill if log_fill > lo else -math.inf,
        full_context=full_context,
    )


def caps_at_log_prices(
    thresholds, *, log_sigma, runaway=0.0, weights=None, log_price: float, log_fill_price: float,
    full_context: bool = False, context_limit_tokens: float | None = None,
) -> np.ndarray:
    """Each query's cap at a quoted price, one query at a time (no clearing).

    ``log_price`` decides solvency and ``log_fill_price`` (<= it) sets the
    solvent queries' caps, as in :func:`clear_consumption_market`, whose
    result carries both: a query of the cleared batch gets here exactly the
    cap the clearing gave it (apart from the rationing of a tie at the margin),
    and a new query gets the cap it would have had in that batch. ``-inf``
    means no price. ``O(1)`` per query once its spread's coverage table is cached.
    """
    tau = np.maximum(validate_thresholds(thresholds), 1.0)
    t_max = validate_context_limit(context_limit_tokens)
    if tau.size == 0:
        return np.zeros(0, dtype=np.int64)
    if full_context and math.isfinite(t_max):
        return np.full(tau.size, int(t_max), dtype=np.int64)
    sig = np.broadcast_to(np.asarray(log_sigma, dtype=float), tau.shape).astype(float)
    w = np.ones_like(tau) if weights is None else np.broadcast_to(np.asarray(weights, dtype=float), tau.shape)
    rho = np.broadcast_to(np.asarray(runaway, dtype=float), tau.shape)
    if (~np.isfinite(sig) | (sig <= 0)).any() or (~np.isfinite(w) | (w <= 0)).any() or ((rho < 0) | (rho >= 1)).any():
        raise InvalidInputError("quoted request", (sig, w, rho), "spreads and weights must be > 0, runaway in [0, 1)")
    types = _group(tau, sig, runaway_odds(rho), np.asarray(w, dtype=float))
    demand = _Demand(types, t_max)
    solvent = log_price < demand.l_solvent
    real = demand.caps(min(log_fill_price, log_price), solvent, t_max)
    return floor_caps(real)[types.inverse]
