"""Ranking and error metrics of a length predictor, overall and per dataset.

Two views (both reported, the first is the headline):

* **per query** (main number): every (problem, sample) pair is one query whose
  true length is that sample's tokens; the problem's prediction is repeated for
  each of its samples. Spearman / Kendall between predicted and true lengths,
  and RMSE of ``log(pred) - log(true tokens)``. This is what the allocator
  faces: the 8 samples of an AMC / AIME problem are 8 queries with different
  lengths that share one prompt, so the irreducible within-problem spread counts.
* **per problem**: one row per problem against its regression target
  (mean log sample length): how well the predictor fits what it is trained on.

Ranks are invariant to ``exp``, so Spearman / Kendall on log or token scale agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from clear_core.errors import InvalidInputError
from clear_predictor.data import LengthDataset, query_arrays, safe_log_tokens


@dataclass
class Scores:
    n: int  # rows scored (queries or problems)
    spearman: float  # Spearman rank correlation, in [-1, 1] (nan if undefined)
    kendall: float  # Kendall tau-b, in [-1, 1] (nan if undefined)
    rmse_log: float  # RMSE of log length, log-tokens
    bias_log: float  # mean(pred - true) of log length, log-tokens

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def score(pred_log, true_log) -> Scores:
    p = np.asarray(pred_log, dtype=float)
    t = np.asarray(true_log, dtype=float)
    if p.shape != t.shape:
        raise InvalidInputError("predictions", p.shape, f"shape differs from the truth {t.shape}")
    if p.size == 0:
        return Scores(0, math.nan, math.nan, math.nan, math.nan)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
        raise InvalidInputError("predictions", "non-finite", "log predictions and truths must be finite")
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        rho = tau = math.nan
    else:
        rho = float(stats.spearmanr(p, t).statistic)
        tau = float(stats.kendalltau(p, t).statistic)
    err = p - t
    return Scores(int(p.size), rho, tau, float(np.sqrt(np.mean(err**2))), float(np.mean(err)))


def evaluate(data: LengthDataset, pred_log) -> dict:
    """{"per_query": {"overall": Scores, dataset: Scores, ...}, "per_problem": {...}} as JSON-able dicts."""
    pred_log = np.asarray(pred_log, dtype=float)
    pq, tokens, rows = query_arrays(data, pred_log)
    tq = safe_log_tokens(tokens)
    ds = np.asarray(data.datasets)
    ds_q = ds[rows]
    out: dict = {"per_query": {}, "per_problem": {}}
    out["per_query"]["overall"] = score(pq, tq).to_json()
    out["per_problem"]["overall"] = score(pred_log, data.log_targets).to_json()
    for name in _dataset_order(ds):
        mq, mp = ds_q == name, ds == name
        out["per_query"][name] = score(pq[mq], tq[mq]).to_json()
        out["per_problem"][name] = score(pred_log[mp], data.log_targets[mp]).to_json()
    return out


def _dataset_order(ds: np.ndarray) -> list[str]:
    known = ["gsm8k", "math500", "amc23", "aime"]
    present = set(ds.tolist())
    return [d for d in known if d in present] + sorted(present - set(known))


def format_table(metrics: dict, title: str = "") -> str:
    """Plain-text table (and markdown-compatible): both views, overall then per dataset."""
    lines = []
    if title:
        lines.append(title)
    for view, label in (("per_query", "per query vs true sample lengths (main)"), ("per_problem", "per problem vs mean-log target")):
        lines.append(f"\n{label}")
        lines.append("| subset | n | Spearman | Kendall | RMSE log | bias log |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, s in metrics[view].items():
            lines.append(
                f"| {name} | {s['n']} | {_f(s['spearman'])} | {_f(s['kendall'])} | {_f(s['rmse_log'])} | {_f(s['bias_log'])} |"
            )
    return "\n".join(lines)


def _f(v) -> str:
    return "nan" if v is None else f"{v:.3f}"
