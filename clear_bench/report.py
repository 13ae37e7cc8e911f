"""Aggregate bench rows and write the Table-1-style markdown report."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

Key = tuple[str, int, str]  # (stream, budget_per_query, policy)


def aggregate(rows: Sequence[dict], field: str = "accuracy") -> dict[Key, tuple[float, float, int]]:
    """(stream, budget, policy) -> (mean, std over seeds, number of seeds)."""
    groups: dict[Key, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(field) is not None:
            groups[(r["stream"], r["budget_per_query"], r["policy"])].append(float(r[field]))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def _ordered(values: Sequence) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def gap_closed(clear: float, uniform: float, oracle: float) -> float | None:
    """Share of the uniform -> oracle gap that ``clear`` closes (None when there is no gap)."""
    gap = oracle - uniform
    return None if abs(gap) < 1e-12 else (clear - uniform) / gap


def markdown_report(rows: Sequence[dict], *, title: str, main: str = "clear", base: str = "uniform") -> str:
    streams = _ordered([r["stream"] for r in rows])
    budgets = sorted(_ordered([r["budget_per_query"] for r in rows]))
    policies = _ordered([r["policy"] for r in rows])
    acc = aggregate(rows, "accuracy")
    lines = [f"# {title}", ""]
    meta = rows[0] if rows else {}
    seeds = sorted({r["seed"] for r in rows})
    lines.append(
        f"Predictions `{meta.get('predictions')}` (log sigma {meta.get('log_sigma', 0):.3g}), "
        f"{meta.get('n_queries')} queries per stream, seeds {seeds}. Accuracy in %, mean ± std over seeds."
    )
    lines.append("")
    for stream in streams:
        lines += [f"## {stream}", ""]
        lines.append("| policy | " + " | ".join(f"{b}" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for p in policies:
            cells = []
            for b in budgets:
                m = acc.get((stream, b, p))
                cells.append("" if m is None else f"{100 * m[0]:.1f} ± {100 * m[1]:.1f}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    if main in policies and base in policies:
        lines += [f"## `{main}` vs `{base}`", ""]
        lines.append(
            "Gain in accuracy points, ratio, and (with `oracle` in the run) the share of the "
            f"{base} → oracle gap that {main} closes."
        )
        lines.append("")
        lines.append("| stream | budget | " + base + " | " + main + " | gain | ratio | gap closed |")
        lines.append("|---|---|---|---|---|---|---|")
        for stream in streams:
            for b in budgets:
                u, c = acc.get((stream, b, base)), acc.get((stream, b, main))
                if u is None or c is None:
                    continue
                o = acc.get((stream, b, "oracle"))
                share = gap_closed(c[0], u[0], o[0]) if o else None
                ratio = f"{c[0] / u[0]:.2f}×" if u[0] > 0 else "n/a (baseline 0)"
                lines.append(
                    f"| {stream} | {b} | {100 * u[0]:.1f} | {100 * c[0]:.1f} | {100 * (c[0] - u[0]):+.1f} | "
                    f"{ratio} | {'' if share is None else f'{100 * share:.0f}%'} |"
                )
        lines.append("")
    for priced in ("clear-cost", "clear-cost-emp", main):  # each market policy against the three uniform baselines on cost
        if priced in policies and base in policies:
            lines += _cost_baselines(rows, streams, budgets, priced, base)
    # What the budget buys: solved per 1k allocated and per 1k generated tokens.
    alloc_eff = aggregate(rows, "solved_per_1k_allocated")
    cons_eff = aggregate(rows, "solved_per_1k_consumed")
    longest = aggregate(rows, "longest_generation_tokens")
    abandon = aggregate(rows, "abandonment_rate")
    lines += ["## What the tokens buy", ""]
    lines.append(
        "Solved per 1,000 allocated tokens / per 1,000 generated tokens (min(cap, length)), "
        "the longest generation (a proxy for GPU batch time) and the abandonment rate, mean over seeds."
    )
    lines.append("")
    lines.append("| stream | budget | policy | /1k allocated | /1k generated | longest gen. | abandoned |")
    lines.append("|---|---|---|---|---|---|---|")
    for stream in streams:
        for b in budgets:
            for p in policies:
                if (stream, b, p) not in alloc_eff:
                    continue
                lines.append(
                    f"| {stream} | {b} | {p} | {alloc_eff[(stream, b, p)][0]:.2f} | {cons_eff[(stream, b, p)][0]:.2f} | "
                    f"{longest[(stream, b, p)][0]:.0f} | {100 * abandon[(stream, b, p)][0]:.1f}% |"
                )
    lines.append("")
    return "\n".join(lines)


def _cost_baselines(rows, streams, budgets, main: str, base: str) -> list[str]:
    """``main`` against three uniform baselines: caps of b, matched to main's generated tokens, and
    (when ``uniform-generated`` ran) filling a budget of b *generated* tokens per query."""
    acc = aggregate(rows, "accuracy")
    matched = aggregate([r for r in rows if r["policy"] == main], "uniform_matched_accuracy")
    spend = aggregate(rows, "generated_vs_budget")
    if not matched:
        return []
    lines = [f"## `{main}` against uniform baselines on cost", ""]
    lines.append(
        f"Accuracy (%) of uniform caps of b; of the uniform cap that generates what {main} generated; of the "
        "uniform cap that fills b generated tokens per query (`uniform-generated`, when it ran); of "
        f"{main}; and {main}'s generated tokens as a share of the budget b N. Means over seeds."
    )
    lines.append("")
    lines.append(f"| stream | budget | {base} | {base} matched | uniform-generated | {main} | {main} − best uniform | "
                 f"{main} / uniform-generated | {main} generated / budget |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for stream in streams:
        for b in budgets:
            key = (stream, b, main)
            if key not in matched or (stream, b, base) not in acc:
                continue
            fill = acc.get((stream, b, "uniform-generated"))
            best = max(acc[(stream, b, base)][0], matched[key][0], fill[0] if fill else 0.0)
            ratio = "" if not fill or fill[0] <= 0 else f"{acc[key][0] / fill[0]:.2f}×"
            lines.append(
                f"| {stream} | {b} | {100 * acc[(stream, b, base)][0]:.1f} | {100 * matched[key][0]:.1f} | "
                f"{'' if fill is None else f'{100 * fill[0]:.1f}'} | {100 * acc[key][0]:.1f} | "
                f"{100 * (acc[key][0] - best):+.1f} | {ratio} | {spend[key][0]:.3f} |"
            )
    lines.append("")
    return lines + _served_baseline(rows, streams, budgets, main)


def _served_baseline(rows, streams, budgets, main: str) -> list[str]:
    """With requests in flight: ``main`` against the best uniform cap served through the same ledger."""
    served = aggregate([r for r in rows if r["policy"] == main and r.get("uniform_served_accuracy") is not None],
                       "uniform_served_accuracy")
    if not served:
        return []
    acc = aggregate(rows, "accuracy")
    lines = [f"## `{main}` against uniform caps served with the same requests in flight", ""]
    lines.append(
        "The baselines above are hindsight and batch: they never hold a reservation. Here the uniform cap "
        "(the best of the cap filling b generated tokens per query and caps from b to the context limit, per "
        "seed in hindsight) is served through the same ledger, holding its caps while they are in flight. "
        "Accuracy (%), means over seeds."
    )
    lines.append("")
    lines.append(f"| stream | budget | uniform served | {main} | {main} − uniform served |")
    lines.append("|---|---|---|---|---|")
    for stream in streams:
        for b in budgets:
            key = (stream, b, main)
            if key not in served:
                continue
            lines.append(f"| {stream} | {b} | {100 * served[key][0]:.1f} | {100 * acc[key][0]:.1f} | "
                         f"{100 * (acc[key][0] - served[key][0]):+.1f} |")
    lines.append("")
    return lines
