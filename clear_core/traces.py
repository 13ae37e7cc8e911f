"""Oracle pools, difficulty strata and traffic streams (Sec. 6, Appendix C).

A *pool* is a JSONL file with one benchmark problem per line and the model's
sampled solutions (schema in ``shared/data/traces/README.md``). A *query* is
one (problem, sample) pair: given a completion cap ``t`` it is solved iff
``t >= tokens and correct``. A *stream* is ``N`` queries drawn with a seed from
the pool by stratum according to a mixture.

Strata (:func:`stratum_of`): the math pools' difficulty tiers (easy = GSM8K,
moderate = MATH levels 1-3, hard = MATH 4-5 and AMC-23, very hard = AIME);
any other dataset (the code pool's ``humaneval``, ``leetcode``,
``codecontests``) is its own stratum. The streams of each pool family live in
a declarative table, ``clear_core/streams.json``: a pool belongs to the first
family whose strata cover its problems' strata.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clear_core.errors import InvalidInputError, TraceFormatError

TIERS = ("easy", "moderate", "hard", "very_hard")
MATH_DATASETS = ("gsm8k", "math500", "amc23", "aime")


@dataclass(frozen=True)
class StreamFamily:
    """The streams of one kind of pool: its strata and each stream's weights over them."""

    name: str
    strata: tuple[str, ...]
    streams: dict[str, tuple[float, ...]]  # stream name -> weights aligned with ``strata``


def load_stream_table(path: str | Path | None = None) -> dict[str, StreamFamily]:
    """The stream table (``clear_core/streams.json`` unless ``path`` names another)."""
    path = Path(path) if path is not None else Path(__file__).with_name("streams.json")
    raw = json.loads(path.read_text())
    families = {}
    for name, fam in raw.items():
        if name.startswith("_"):
            continue
        strata = tuple(fam["strata"])
        streams = {}
        for stream, weights in fam["streams"].items():
            unknown = set(weights) - set(strata)
            if unknown:
                raise InvalidInputError("stream table", f"{name}/{stream}", f"weights name unknown strata {sorted(unknown)}")
            streams[stream] = tuple(float(weights.get(s, 0.0)) for s in strata)
        families[name] = StreamFamily(name, strata, streams)
    return families


STREAM_FAMILIES: dict[str, StreamFamily] = load_stream_table()
#: Traffic mixtures of the math pools over (easy, moderate, hard, very hard).
MIXTURES: dict[str, tuple[float, ...]] = STREAM_FAMILIES["math"].streams
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
        """The problem's stratum (:func:`stratum_of`): a difficulty tier in the math pools."""
        return stratum_of(self.dataset, self.level)


def stratum_of(dataset: str, level: int | None) -> str:
    """A math dataset's difficulty tier (:func:`tier_of`); any other dataset is its own stratum."""
    return tier_of(dataset, level) if dataset in MATH_DATASETS else dataset


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


def stream_family(problems: Sequence[Problem]) -> StreamFamily:
    """The family of the stream table that covers every stratum of this pool."""
    present = {p.tier for p in problems}
    for fam in STREAM_FAMILIES.values():
        if present <= set(fam.strata):
            return fam
    raise InvalidInputError("pool", sorted(present), "no stream family of clear_core/streams.json covers these strata")


def pool_streams(problems: Sequence[Problem]) -> list[str]:
    """The stream names defined for this pool's family."""
    return list(stream_family(problems).streams)


def _mixture(problems: Sequence[Problem], mixture: str | Sequence[float]) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """(name, strata, weights) of a stream name of the pool's family, or of explicit weights."""
    fam = stream_family(problems)
    if isinstance(mixture, str):
        if mixture not in fam.streams:
            raise InvalidInputError("stream", mixture, f"expected one of {sorted(fam.streams)} for a {fam.name} pool")
        return mixture, fam.strata, fam.streams[mixture]
    weights = tuple(mixture)
    if len(weights) != len(fam.strata):
        raise InvalidInputError("mixture", weights, f"needs {len(fam.strata)} weights {fam.strata}")
    return "custom", fam.strata, weights


def query_weights(problems: Sequence[Problem], mixture: str | Sequence[float]) -> np.ndarray:
    """The probability of each (problem, sample) pair of :func:`pool_queries` under a stream's mixture.

    A stream draws a stratum by its weight, then a pair uniformly within it,
    so a pair weighs ``weight(stratum) / pairs(stratum)``: a calibration set
    weighted by it has the stream's composition.
    """
    _, strata, weights = _mixture(problems, mixture)
    share = dict(zip(strata, weights))
    tiers = [p.tier for p, _ in pool_queries(problems)]
    size = {t: tiers.count(t) for t in set(tiers)}
    return np.array([share.get(t, 0.0) / size[t] for t in tiers], dtype=float)


def draw_by_stratum(items: Sequence, strata_of_items: Sequence[str], strata: Sequence[str], weights, n: int,
                    rng: np.random.Generator, name: str) -> list:
    """``n`` items drawn by stratum weights; without replacement where a stratum has enough, else with."""
    by: dict[str, list] = {t: [] for t in strata}
    for item, t in zip(items, strata_of_items):
        by[t].append(item)
    chosen: list = []
    for t, count in zip(strata, tier_counts(n, weights)):
        if count == 0:
            continue
        pool = by[t]
        if not pool:
            raise InvalidInputError("stream", name, f"the pool has no {t} queries")
        idx = rng.choice(len(pool), size=count, replace=count > len(pool))
        chosen.extend(pool[i] for i in idx)
    order = rng.permutation(len(chosen))  # interleave strata as real traffic would
    return [chosen[i] for i in order]


def make_stream(
    problems: Sequence[Problem],
    mixture: str | Sequence[float] = "balanced",
    n: int = DEFAULT_STREAM_SIZE,
    seed: int = 0,
) -> Stream:
    """Draw ``n`` queries by stratum; without replacement where a stratum has enough
    (problem, sample) pairs, with replacement where it is smaller than its share."""
    name, strata, weights = _mixture(problems, mixture)
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise InvalidInputError("n", n, "must be a positive integer")
    rng = np.random.default_rng(seed)
    pairs = pool_queries(problems)
    chosen = draw_by_stratum(pairs, [p.tier for p, _ in pairs], strata, weights, n, rng, name)
    return _stream(name, seed, chosen)


def _stream(name: str, seed: int, chosen: list[tuple[Problem, int]]) -> Stream:
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


def split_halves(problems: Sequence[Problem], seed: int) -> tuple[list[Problem], list[Problem]]:
    """The pool in two halves (the first has ``len // 2`` problems) by a seeded hash of each problem's id:
    the same ids and seed give the same halves on every machine."""
    key = lambda p: hashlib.blake2b(f"{int(seed)}:{p.id}".encode(), digest_size=8).digest()  # noqa: E731
    ordered = sorted(problems, key=key)
    return ordered[: len(ordered) // 2], ordered[len(ordered) // 2:]


def median_tokens(problem: Problem) -> float:
    """Median of a problem's sample lengths (the predictor's regression target)."""
    return float(np.median([s.tokens for s in problem.samples]))


def log_noise(tokens: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """True lengths times log-normal noise ``exp(N(0, sigma^2))`` (Fig. 11 protocol)."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise InvalidInputError("sigma", sigma, "must be finite and >= 0")
    rng = np.random.default_rng(seed)
    return np.asarray(tokens, dtype=float) * np.exp(rng.normal(0.0, sigma, size=len(tokens)))


def pool_fingerprint(problems: Iterable[Problem]) -> str:
    """A short hash of a pool's content (problem ids, prompts, samples' lengths and verdicts), the same
    wherever the file lives: a load test compares it with what a replaying server reports (``GET /v1/models``)
    to know both replay the same pool."""
    digest = hashlib.sha256()
    for p in sorted(problems, key=lambda p: p.id):
        digest.update(json.dumps([p.id, p.problem, [[s.tokens, s.correct] for s in p.samples]]).encode())
    return digest.hexdigest()[:16]
