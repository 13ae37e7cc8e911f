"""The request plan of a load test: one traffic stream from a trace pool (clear_core.traces)."""

from __future__ import annotations

from dataclasses import dataclass

from clear_core.traces import Problem, make_stream


@dataclass(frozen=True)
class PlannedRequest:
    index: int  # position in the stream
    problem_id: str
    sample_index: int  # recorded sample the replay engine plays back
    prompt: str  # the problem statement, sent as the user message
    answer: str  # reference answer, for grading a real engine
    tokens: int  # recorded completion length of that sample
    correct: bool  # the recorded sample's grader verdict
    tier: str


def plan_stream(problems: list[Problem], stream: str, n: int, seed: int) -> list[PlannedRequest]:
    """Build the same stream the offline bench scores, as requests."""
    s = make_stream(problems, stream, n, seed)
    answers = {p.id: p.answer for p in problems}
    return [
        PlannedRequest(i, pid, int(j), prompt, answers[pid], int(tok), bool(ok), tier)
        for i, (pid, j, prompt, tok, ok, tier) in enumerate(
            zip(s.problem_ids, s.sample_index.tolist(), s.prompts, s.tokens.tolist(), s.correct.tolist(), s.tiers)
        )
    ]
