"""What the replay engine replays: a trace pool, or a synthetic workload the project generates.

A query is one (problem, sample) pair of an oracle pool (schema in
``shared/data/traces/README.md``); given a cap ``t`` it is solved iff
``t >= tokens and correct``. Prompts are matched by exact text (after
stripping surrounding whitespace). A prompt that matches no problem is mapped
to a problem chosen by a stable hash of the prompt, and the response says
``matched: false``, so any client (``"Hello"``) still gets a realistic answer.

Synthetic workload (no trace file configured): ``n`` problems labelled
``synthetic/<tier>-<k>`` whose prompts start with ``[synthetic workload]``.
Completion lengths are log-normal around per-tier medians close to the main
pool's (easy 230, moderate 700, hard 2,200, very hard 5,000 tokens; sigma 0.6;
censored at 8,192 as the real pools are), correctness by tier (0.87, 0.85,
0.73, 0.40, the main pool's accuracies), one sample per problem, responses
synthesised as filler. Harder problems have longer prompts, so the embedded
prompt-length predictor sees some signal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from clear_core.traces import POOL_GENERATION_CAP_TOKENS, TIERS, Problem, Sample, load_pool, pool_fingerprint
from deployments.errors import BadRequestError

SYNTHETIC_PREFIX = "[synthetic workload]"
#: Generation cap of the recorded pools; longer synthetic samples are censored here.
RECORDED_CAP_TOKENS = POOL_GENERATION_CAP_TOKENS
_TIER_MEDIAN_TOKENS = {"easy": 230, "moderate": 700, "hard": 2200, "very_hard": 5000}
_TIER_ACCURACY = {"easy": 0.87, "moderate": 0.85, "hard": 0.73, "very_hard": 0.40}
_TIER_DATASET = {"easy": ("gsm8k", None), "moderate": ("math500", 2), "hard": ("math500", 5), "very_hard": ("aime", None)}
_TIER_SENTENCES = {"easy": 2, "moderate": 4, "hard": 7, "very_hard": 10}
_LOG_SIGMA = 0.6


def _key(text: str) -> str:
    return text.strip()


@dataclass(frozen=True)
class ReplayPlan:
    """One recorded sample to replay under a cap (the trace semantics, for any engine)."""

    problem: Problem  # the problem the prompt names (or a stable hashed choice)
    sample_index: int  # which recorded sample
    matched: bool  # the prompt is the problem's text
    synthetic: bool  # the workload is the project's synthetic one

    @property
    def recorded_tokens(self) -> int:
        """The sample's recorded completion length."""
        return self.problem.samples[self.sample_index].tokens

    def tokens_under(self, cap: int) -> int:
        """Tokens the engine generates under ``cap``: ``min(cap, recorded length)``."""
        return min(int(cap), self.recorded_tokens)

    def finish_reason(self, cap: int) -> str:
        sample = self.problem.samples[self.sample_index]
        return "stop" if cap >= sample.tokens and not sample.truncated else "length"

    def info(self, cap: int) -> dict:
        """What the response reports: solved iff ``cap >= recorded length and correct``."""
        sample = self.problem.samples[self.sample_index]
        return {
            "problem_id": self.problem.id,
            "sample_index": self.sample_index,
            "solved": bool(cap >= sample.tokens and sample.correct),
            "matched": self.matched,
            "synthetic": self.synthetic,
            "tokens": sample.tokens,
        }


class Workload:
    """Problems by prompt text."""

    def __init__(self, problems: list[Problem], synthetic: bool, source: str):
        self.problems = problems
        self.synthetic = synthetic
        self.source = source  # trace path, or "synthetic(n=..., seed=...)"
        self._fingerprint: str | None = None  # pool_fingerprint, computed on first describe()
        self._by_prompt = {}
        for p in problems:
            self._by_prompt.setdefault(_key(p.problem), p)

    def __len__(self) -> int:
        return len(self.problems)

    def describe(self) -> dict:
        """What a client may know of the replayed pool (no server path): its size and content hash, so a
        load test can check it draws its stream from the same pool (:func:`clear_core.traces.pool_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = pool_fingerprint(self.problems)
        return {"problems": len(self.problems), "synthetic": self.synthetic, "fingerprint": self._fingerprint}

    def lookup(self, prompt: str) -> tuple[Problem, bool]:
        """The problem whose text is ``prompt`` (matched=True), else a stable hashed choice."""
        p = self._by_prompt.get(_key(prompt))
        if p is not None:
            return p, True
        h = int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest()[:8], "big")
        return self.problems[h % len(self.problems)], False

    def plan(self, prompt: str, sample_index: int | None) -> ReplayPlan:
        """The sample to replay for a request; an index the problem does not have is a 400."""
        problem, matched = self.lookup(prompt)
        j = 0 if sample_index is None else int(sample_index)
        if not 0 <= j < len(problem.samples):
            raise BadRequestError(
                f"clear_sample_index={j} out of range: problem {problem.id} has {len(problem.samples)} samples",
                param="clear_sample_index",
            )
        return ReplayPlan(problem, j, matched, self.synthetic)


def load_workload(trace_path: str | None, n_synthetic: int = 200, seed: int = 0) -> Workload:
    if trace_path:
        return Workload(load_pool(trace_path), synthetic=False, source=str(trace_path))
    return Workload(synthetic_problems(n_synthetic, seed), synthetic=True, source=f"synthetic(n={n_synthetic}, seed={seed})")


def synthetic_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` synthetic problems, a quarter per tier (module docstring)."""
    rng = np.random.default_rng(seed)
    problems = []
    for k in range(n):
        tier = TIERS[k % len(TIERS)]
        dataset, level = _TIER_DATASET[tier]
        tokens = int(round(_TIER_MEDIAN_TOKENS[tier] * float(np.exp(rng.normal(0.0, _LOG_SIGMA)))))
        tokens = max(1, min(tokens, RECORDED_CAP_TOKENS))
        correct = bool(rng.random() < _TIER_ACCURACY[tier])
        a, b = (int(x) for x in rng.integers(2, 999, size=2))
        body = " ".join(
            f"Step {j + 1}: combine {a + j} and {b * (j + 1)} as described." for j in range(_TIER_SENTENCES[tier])
        )
        prompt = f"{SYNTHETIC_PREFIX} Problem {k} ({tier}). {body} What is the final value?"
        problems.append(
            Problem(
                id=f"synthetic/{tier}-{k:04d}",
                dataset=dataset,
                level=level,
                problem=prompt,
                answer=str(a + b),
                samples=(Sample(tokens=tokens, correct=correct, truncated=tokens >= RECORDED_CAP_TOKENS),),
                response=None,
            )
        )
    return problems
