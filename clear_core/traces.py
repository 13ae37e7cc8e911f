"""Oracle pools, difficulty tiers and traffic streams (Sec. 6, Appendix C).

A *pool* is a JSONL file with one benchmark problem per line and the model's
sampled solutions (schema in ``shared/data/traces/README.md``). A *query* is
one (problem, sample) pair: given a completion cap ``t`` it is solved iff
``t >= tokens and correct``. A *stream* is ``N`` queries drawn with a seed from
the pool by difficulty tier according to a mixture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clear_core.errors import InvalidInputError, TraceFormatError

TIERS = ("easy", "moderate", "hard", "very_hard")

#: Traffic mixtures over (easy, moderate, hard, very hard).
MIXTURES: dict[str, tuple[float, float, float, float]] = {
    "balanced": (0.25, 0.25, 0.25, 0.25),
    "mostly-easy": (0.55, 0.25, 0.15, 0.05),
    "mostly-hard": (0.05, 0.15, 0.25, 0.55),
    "u-shaped": (0.45, 0.05, 0.05, 0.45),
}
DEFAULT_STREAM_SIZE = 500
#: The recorded models' generation cap in the pools (8,192 for the 7B models): the
#: context limit of the bench and the largest cap the service gives by default.
POOL_GENERATION_CAP_TOKENS = 8192


@dataclass(frozen=True)
class Sample:
    tokens: int  # completion length in Qwen2.5 tokens
    correct: bool  # the benchmark grader's verdict
    truncated: bool  # hit the generation cap, so the length is censored


@dataclass(frozen=True)
class Problem:
    id: str  # dataset/unique id, stable across pools
    dataset: str  # gsm8k, math500, amc23 or aime
    level: int | None  # MATH difficulty 1-5, else None
    problem: str  # the prompt text
    answer: str  # reference answer
    samples: tuple[Sample, ...]
    response: str | None = None  # full text of the first sample, when present
    subject: str | None = None

    @property
    def tier(self) -> str:
        return tier_of(self.dataset, self.level)


def tier_of(dataset: str, level: int | None) -> str:
    """Difficulty tier: easy = GSM8K, moderate = MATH levels 1-3,
    hard = MATH levels 4-5 and AMC-23, very hard = AIME."""
    if dataset == "gsm8k":
        return "easy"
    if dataset == "math500":
        if level is None:
            raise TraceFormatError(f"math500 problem without a level: {dataset!r}")
        return "moderate" if int(level) <= 3 else "hard"
    if dataset == "amc23":
        return "hard"
    if dataset == "aime":
        return "very_hard"
    raise TraceFormatError(f"unknown dataset {dataset!r} (expected gsm8k, math500, amc23 or aime)")


def _parse_problem(obj: dict, where: str) -> Problem:
    try:
        samples = tuple(
            Sample(tokens=int(s["tokens"]), correct=bool(s["correct"]), truncated=bool(s.get("truncated", False)))
            for s in obj["samples"]
        )
        level = obj.get("level")
        prob = Problem(
            id=str(obj["id"]),
            dataset=str(obj["dataset"]),
            level=int(level) if level is not None else None,
            problem=str(obj["problem"]),
            answer=str(obj.get("answer", "")),
            samples=samples,
            response=obj.get("response"),
            subject=obj.get("subject"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceFormatError(f"{where}: {type(exc).__name__}: {exc}") from exc
    if not samples:
        raise TraceFormatError(f"{where}: problem {prob.id!r} has no samples")
    if any(s.tokens < 0 for s in samples):
        raise TraceFormatError(f"{where}: problem {prob.id!r} has a negative token count")
    prob.tier  # validates dataset/level
    return prob


def load_pool(path: str | Path) -> list[Problem]:
    """Read an oracle pool (JSONL); raise :class:`TraceFormatError` naming the bad line."""
    path = Path(path)
    problems: list[Problem] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
            problems.append(_parse_problem(obj, f"{path}:{lineno}"))
    if not problems:
        raise TraceFormatError(f"{path}: empty pool")
    return problems


@dataclass(frozen=True)
class Stream:
    """N queries, each one (problem, sample) pair. Arrays are aligned by query."""

    name: str  # mixture name
    seed: int
    problem_ids: tuple[str, ...]  # query -> problem id
    prompts: tuple[str, ...]  # query -> prompt text
    sample_index: np.ndarray  # query -> index of the sample within its problem
    tokens: np.ndarray  # query -> true completion length (tokens)
    correct: np.ndarray  # query -> the sample's answer is correct
    tiers: tuple[str, ...]  # query -> difficulty tier
    datasets: tuple[str, ...] = field(default=())  # query -> dataset

    def __len__(self) -> int:
        return len(self.problem_ids)

    @property
    def query_ids(self) -> list[str]:
        return [f"{p}#{i}" for p, i in zip(self.problem_ids, self.sample_index.tolist())]


def pool_queries(problems: Iterable[Problem]) -> list[tuple[Problem, int]]:
    """Every (problem, sample index) pair of a pool."""
    return [(p, j) for p in problems for j in range(len(p.samples))]


def tier_counts(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` by ``weights`` with the largest-remainder rule (sums to ``n``)."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
        raise InvalidInputError("mixture", tuple(weights), "weights must be >= 0 and not all 0")
    raw = n * w / w.sum()
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    for i in np.argsort(-(raw - counts), kind="stable")[:rest]:
        counts[i] += 1
    return counts.tolist()


def make_stream(
    problems: Sequence[Problem],
    mixture: str | Sequence[float] = "balanced",
    n: int = DEFAULT_STREAM_SIZE,
    seed: int = 0,
) -> Stream:
    """Draw ``n`` queries by tier; without replacement where a tier has enough
    (problem, sample) pairs, with replacement where it is smaller than its share."""
    if isinstance(mixture, str):
        if mixture not in MIXTURES:
            raise InvalidInputError("stream", mixture, f"expected one of {sorted(MIXTURES)}")
        name, weights = mixture, MIXTURES[mixture]
    else:
        name, weights = "custom", tuple(mixture)
    if len(weights) != len(TIERS):
        raise InvalidInputError("mixture", tuple(weights), f"needs {len(TIERS)} weights {TIERS}")
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise InvalidInputError("n", n, "must be a positive integer")
    rng = np.random.default_rng(seed)
    by_tier: dict[str, list[tuple[Problem, int]]] = {t: [] for t in TIERS}
    for pair in pool_queries(problems):
        by_tier[pair[0].tier].append(pair)
    chosen: list[tuple[Problem, int]] = []
    for tier, count in zip(TIERS, tier_counts(n, weights)):
        if count == 0:
            continue
        pairs = by_tier[tier]
        if not pairs:
            raise InvalidInputError("stream", name, f"the pool has no {tier} queries")
        idx = rng.choice(len(pairs), size=count, replace=count > len(pairs))
        chosen.extend(pairs[i] for i in idx)
    order = rng.permutation(len(chosen))  # interleave tiers as real traffic would
    chosen = [chosen[i] for i in order]
    return Stream(
        name=name,
        seed=seed,
        problem_ids=tuple(p.id for p, _ in chosen),
        prompts=tuple(p.problem for p, _ in chosen),
        sample_index=np.array([j for _, j in chosen], dtype=np.int64),
        tokens=np.array([p.samples[j].tokens for p, j in chosen], dtype=np.int64),
        correct=np.array([p.samples[j].correct for p, j in chosen], dtype=bool),
        tiers=tuple(p.tier for p, _ in chosen),
        datasets=tuple(p.dataset for p, _ in chosen),
    )


def median_tokens(problem: Problem) -> float:
    """Median of a problem's sample lengths (the predictor's regression target)."""
    return float(np.median([s.tokens for s in problem.samples]))


def log_noise(tokens: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """True lengths times log-normal noise ``exp(N(0, sigma^2))`` (Fig. 11 protocol)."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise InvalidInputError("sigma", sigma, "must be finite and >= 0")
    rng = np.random.default_rng(seed)
    return np.asarray(tokens, dtype=float) * np.exp(rng.normal(0.0, sigma, size=len(tokens)))
