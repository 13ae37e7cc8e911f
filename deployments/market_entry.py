"""How one HTTP request enters the market: its ``n`` choices as one entry, a reasoning model's answer
allowance, and the least cap worth serving.

**n choices, one decision.** A request for ``n`` choices is priced the way the
best-of-k market prices ``k`` trajectories of one problem
(:mod:`clear_core.best_of_k`): one market entry whose threshold is ``n`` times
one choice's, whose client cap is ``n`` times the client's, and whose cap is
the group's total, a multiple of ``n`` of which each choice gets an ``n``-th
(:func:`clear_core.decision.usable_cap`). So at a shadow price ``lambda`` a group
pays ``n`` times what one choice pays: its chance of admission is that of one
request needing ``n`` times the tokens, and an insolvent group is abandoned
whole. The ledger reserves the group's caps, charges what all choices
generated and refunds the rest.

**Reasoning models.** When vLLM runs a reasoning parser, CLEAR's cap is the
*thinking budget*: vLLM ends the thought there (its end marker forced) and the
answer gets up to ``engine.answer_tokens`` more, so a request given less than
it asked for still answers instead of stopping mid-thought. Each choice's
entry is its predicted reasoning tokens plus the allowance; the reservation is
thinking budget plus allowance; a choice's ``max_tokens`` sent to vLLM is the
two together. A client's own ``thinking_token_budget`` lowers the cap, never
raises it; a client cap at or below the allowance splits evenly between
thought and answer.

**Floors.** A cap below a request's floor buys nothing, so the market abandons
the request instead (``INSOLVENT``, or ``POOL_EMPTY`` when the pool cannot
cover it): a structured answer (a JSON format, structured outputs, a tool call)
gets at least ``allocator.advanced.structured_floor_tokens`` per choice, a
reasoning choice at least its answer allowance plus one thinking token. A
floor never exceeds what the client itself asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deployments.messages import Prediction


@dataclass(frozen=True)
class MarketEntry:
    n: int  # choices, decided as one
    client_cap_tokens: int  # the most one choice may generate, as the client asked (within the context)
    answer_tokens: int = 0  # reasoning: the answer allowance per choice (0: not a reasoning engine)
    floor_tokens: int = 1  # the least cap worth serving, per choice

    @classmethod
    def of(cls, req, client_cap_tokens: int, *, reasoning: bool = False, answer_tokens: int = 0,
           structured_floor_tokens: int = 1) -> MarketEntry:
        """The entry of a parsed request whose own cap (per choice, within the context) is ``client_cap_tokens``."""
        cap = int(client_cap_tokens)
        answer = 0
        if reasoning:
            answer = int(answer_tokens) if cap > answer_tokens else cap // 2
            own = getattr(req, "thinking_token_budget", None)
            if own is not None:
                cap = min(cap, int(own) + answer)
        floor = structured_floor_tokens if getattr(req, "structured", False) else 1
        if reasoning:
            floor = max(floor, answer + 1)
        return cls(n=int(getattr(req, "n", 1) or 1), client_cap_tokens=cap, answer_tokens=answer,
                   floor_tokens=max(1, min(floor, cap)))

    def priced(self, pred: Prediction) -> Prediction:
        """The prediction the market prices: the group's threshold, each choice's answer allowance included."""
        if self.n == 1 and self.answer_tokens == 0:
            return pred
        raw = pred.raw_threshold_tokens
        return dataclasses.replace(
            pred, threshold_tokens=self.n * (pred.threshold_tokens + self.answer_tokens),
            raw_threshold_tokens=None if raw is None else self.n * (raw + self.answer_tokens))

    @property
    def group_client_cap_tokens(self) -> int:
        return self.n * self.client_cap_tokens

    @property
    def group_floor_tokens(self) -> int:
        return self.n * self.floor_tokens

    def per_choice(self, group_cap_tokens: int) -> int:
        """Each choice's cap (``max_tokens`` vLLM gets) out of the group's reserved cap."""
        return int(group_cap_tokens) // self.n

    def thinking_budget(self, group_cap_tokens: int) -> int | None:
        """A reasoning choice's thinking budget (its cap less the answer allowance); None when not reasoning."""
        if not self.answer_tokens:
            return None
        return self.per_choice(group_cap_tokens) - self.answer_tokens
