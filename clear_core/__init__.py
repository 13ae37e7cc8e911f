"""CLEAR core: utility curves, market clearing, policies, budget, ledger, online market, traces, simulator.

numpy + scipy only: this package never imports Ray, torch, transformers,
vLLM or a web framework (a test enforces it), so it is cheap to import from
the allocator, the offline bench and the tests alike.
"""

from clear_core.budget import Budget, PerQueryBudget, TokenBucketBudget, make_budget
from clear_core.errors import (
    BudgetExhaustedError,
    ClearError,
    InvalidInputError,
    TraceFormatError,
    UnknownPolicyError,
)
from clear_core.ledger import LedgerState, Settlement, TokenLedger
from clear_core.market import MarketResult, adaptive_beta, clear_market
from clear_core.online_market import Decision, DecisionReason, OnlineMarket
from clear_core.policies import POLICIES, Allocation, Policy, Truth, get_policy, parse_policy, parse_policy_list
from clear_core.simulate import Score, score
from clear_core.traces import MIXTURES, TIERS, Problem, Stream, load_pool, make_stream
from clear_core.utility import Quadratic, ShiftedSurge, Triangular, make_utility

__all__ = [
    "Allocation",
    "Budget",
    "BudgetExhaustedError",
    "ClearError",
    "Decision",
    "DecisionReason",
    "InvalidInputError",
    "LedgerState",
    "MIXTURES",
    "MarketResult",
    "OnlineMarket",
    "PerQueryBudget",
    "POLICIES",
    "Policy",
    "Problem",
    "Quadratic",
    "Score",
    "Settlement",
    "ShiftedSurge",
    "Stream",
    "TIERS",
    "TokenBucketBudget",
    "TokenLedger",
    "TraceFormatError",
    "Triangular",
    "Truth",
    "UnknownPolicyError",
    "adaptive_beta",
    "clear_market",
    "get_policy",
    "load_pool",
    "make_budget",
    "make_stream",
    "make_utility",
    "parse_policy",
    "parse_policy_list",
    "score",
]
