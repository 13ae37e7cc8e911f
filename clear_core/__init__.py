"""CLEAR core: utility curves, market clearing, policies, traces, simulator.

numpy + scipy only: this package never imports Ray, torch, transformers,
vLLM or a web framework (a test enforces it), so it is cheap to import from
the allocator, the offline bench and the tests alike.
"""

from clear_core.errors import (
    BudgetExhaustedError,
    ClearError,
    InvalidInputError,
    TraceFormatError,
    UnknownPolicyError,
)
from clear_core.market import MarketResult, adaptive_beta, clear_market
from clear_core.policies import POLICIES, Allocation, Policy, Truth, get_policy, parse_policy
from clear_core.simulate import Score, score
from clear_core.traces import MIXTURES, TIERS, Problem, Stream, load_pool, make_stream
from clear_core.utility import Quadratic, ShiftedSurge, Triangular, make_utility

__all__ = [
    "Allocation",
    "BudgetExhaustedError",
    "ClearError",
    "InvalidInputError",
    "MIXTURES",
    "MarketResult",
    "POLICIES",
    "Policy",
    "Problem",
    "Quadratic",
    "Score",
    "ShiftedSurge",
    "Stream",
    "TIERS",
    "TraceFormatError",
    "Triangular",
    "Truth",
    "UnknownPolicyError",
    "adaptive_beta",
    "clear_market",
    "get_policy",
    "load_pool",
    "make_stream",
    "make_utility",
    "parse_policy",
    "score",
]
