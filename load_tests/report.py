"""Summaries, the side-by-side table and the over-time figures of a load test.

A load test writes, per target, ``LABEL.records.jsonl`` (one
:class:`~load_tests.driver.RequestRecord` a line) and ``LABEL.status.jsonl``
(the polls of ``/v1/clear/status``, each with ``t_s`` on the records' clock).
From those files alone::

    python -m load_tests.report --results artifacts/load-balanced --out artifacts/load-balanced

draws ``over_time.png`` (what the clients saw: outcomes per second, 429s
included, accuracy and 429 share so far, latency) and
``allocator_over_time.png`` (what the allocator did: the shadow price, the
abandonment rate, the budget pool and the books), one column per target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from load_tests.driver import RequestRecord


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict:
    n = len(records)
    ok = [r for r in records if r.status == "ok"]
    solved = sum(r.solved for r in records)
    generated = sum(r.completion_tokens for r in ok)
    allocated = sum(r.allocated_tokens or 0 for r in ok)
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "requests": n,
        "ok": len(ok),
        "abandoned_429": sum(r.status == "abandoned" for r in records),
        "rejected_4xx": sum(r.status == "rejected" for r in records),
        "errors": sum(r.status in ("error", "timeout") for r in records),
        "rate_429": sum(r.status == "abandoned" for r in records) / n if n else 0.0,
        "solved": solved,
        "accuracy": solved / n if n else 0.0,
        "wall_s": wall_s,
        "goodput_solved_per_s": solved / wall_s if wall_s > 0 else 0.0,
        "tokens_allocated": allocated,
        "tokens_generated": generated,
        "solved_per_1k_generated": 1000.0 * solved / generated if generated else 0.0,
        "solved_per_1k_allocated": 1000.0 * solved / allocated if allocated else 0.0,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "latency_p50_s": _pct(lat, 50),
        "latency_p90_s": _pct(lat, 90),
        "latency_p99_s": _pct(lat, 99),
        "mean_shadow_price": float(np.mean([r.shadow_price for r in records if r.shadow_price is not None]))
        if any(r.shadow_price is not None for r in records) else None,
    }


ROWS = [
    ("requests", "requests", "{:d}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("solved", "solved", "{:d}"),
    ("rate_429", "429 rate", "{:.1%}"),
    ("errors", "errors", "{:d}"),
    ("goodput_solved_per_s", "solved / s", "{:.2f}"),
    ("solved_per_1k_generated", "solved / 1k generated tok", "{:.2f}"),
    ("solved_per_1k_allocated", "solved / 1k allocated tok", "{:.2f}"),
    ("tokens_allocated", "tokens allocated", "{:,d}"),
    ("tokens_generated", "tokens generated", "{:,d}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("latency_p50_s", "latency p50 (s)", "{:.3f}"),
    ("latency_p99_s", "latency p99 (s)", "{:.3f}"),
    ("mean_shadow_price", "mean shadow price", "{:.4g}"),
    ("wall_s", "wall time (s)", "{:.1f}"),
]


def side_by_side(summaries: dict[str, dict]) -> str:
    """Markdown table: one column per target (deployment or policy)."""
    labels = list(summaries)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, name, fmt in ROWS:
        cells = []
        for lab in labels:
            v = summaries[lab].get(key)
            cells.append("" if v is None else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the recorded files ------------------------------------------------------------------

RECORDS_SUFFIX = ".records.jsonl"
STATUS_SUFFIX = ".status.jsonl"


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_run(out: Path, label: str, records: Sequence[RequestRecord], status: Sequence[dict] | None = None) -> list[Path]:
    """``LABEL.records.jsonl`` and, when there are polls, ``LABEL.status.jsonl`` under ``out``."""
    paths = [_write_jsonl(out / f"{label}{RECORDS_SUFFIX}", [r.as_dict() for r in records])]
    if status:
        paths.append(_write_jsonl(out / f"{label}{STATUS_SUFFIX}", list(status)))
    return paths


def read_records(path: Path) -> list[RequestRecord]:
    fields = {f.name for f in dataclasses.fields(RequestRecord)}
    return [RequestRecord(**{k: v for k, v in row.items() if k in fields}) for row in _read_jsonl(path)]


def load_results(paths: Sequence[Path]) -> tuple[dict[str, list[RequestRecord]], dict[str, list[dict]]]:
    """Records and status polls per target from ``*.records.jsonl`` files or directories holding them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob(f"*{RECORDS_SUFFIX}"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such results file or directory: {p}")
    if not files:
        raise FileNotFoundError(f"no *{RECORDS_SUFFIX} under {', '.join(map(str, paths))}")
    runs, statuses = {}, {}
    for f in files:
        label = f.name[: -len(RECORDS_SUFFIX)] if f.name.endswith(RECORDS_SUFFIX) else f.stem
        runs[label] = read_records(f)
        sibling = f.with_name(f"{label}{STATUS_SUFFIX}")
        statuses[label] = _read_jsonl(sibling) if sibling.is_file() else []
    return runs, statuses


# -- the figures ---------------------------------------------------------------------------

OUTCOMES = (  # (key, label, colour, hatch): stacked bottom first
    ("solved", "answered, solved", "tab:green", None),
    ("unsolved", "answered, not solved", "tab:orange", None),
    ("abandoned", "429 abandoned", "tab:red", "xx"),
    ("rejected", "rejected (other 4xx)", "0.6", None),
    ("error", "error / timeout", "black", None),
)
SHORT = {"solved": "solved", "unsolved": "not solved", "abandoned": "abandoned (429)", "rejected": "other 4xx",
         "error": "errors"}
TITLE_FONTSIZE = 11.0
COLUMN_WIDTH_IN = 4.6
NICE_BIN_S = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600)


def outcome_of(r: RequestRecord) -> str:
    if r.status == "ok":
        return "solved" if r.solved else "unsolved"
    if r.status == "abandoned":
        return "abandoned"
    if r.status == "rejected":
        return "rejected"
    return "error"


def bin_width(span_s: float, target_bins: int = 30) -> float:
    """A round bin width giving about ``target_bins`` bins over ``span_s`` seconds."""
    want = max(span_s, 1e-9) / target_bins
    return next((w for w in NICE_BIN_S if w >= want), NICE_BIN_S[-1])


def _bins(runs: Mapping[str, Sequence[RequestRecord]]) -> np.ndarray:
    end = max((r.start_s for recs in runs.values() for r in recs), default=0.0)
    w = bin_width(end)
    return np.arange(0.0, end + w + 1e-9, w)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_right(ax, handles_labels: dict) -> None:
    if handles_labels:
        ax.legend(list(handles_labels.values()), list(handles_labels), fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _collect(axes_row, into: dict) -> None:
    for ax in axes_row:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            into.setdefault(lab, h)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_in`` inches at ``fontsize`` points."""
    import textwrap

    return textwrap.fill(text, max(20, int(width_in * 72.0 / (0.62 * fontsize)) - 4))


def _title(fig, text: str) -> None:
    fig.suptitle(_wrap(text, fig.get_figwidth(), TITLE_FONTSIZE), fontsize=TITLE_FONTSIZE)


def _grid(plt, n_rows: int, labels: Sequence[str], height_per_row: float):
    cols = max(1, len(labels))
    fig, axes = plt.subplots(n_rows, cols, figsize=(COLUMN_WIDTH_IN * cols + 2.6, height_per_row * n_rows), squeeze=False,
                             sharex="col", sharey="row", layout="constrained")
    for j, label in enumerate(labels):
        axes[0, j].set_title(_wrap(label, COLUMN_WIDTH_IN, 10), fontsize=10)
        axes[-1, j].set_xlabel("time since the start (s; requests at their arrival)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    return fig, axes


def over_time_figure(runs: Mapping[str, Sequence[RequestRecord]]):
    """What the clients saw: outcomes per second (429s included), accuracy and 429 share so far, latency."""
    plt = _plt()
    labels = list(runs)
    fig, axes = _grid(plt, 3, labels, 2.9)
    edges = _bins(runs)
    width = float(edges[1] - edges[0]) if len(edges) > 1 else 1.0
    top = 0.0
    for j, label in enumerate(labels):
        recs = sorted(runs[label], key=lambda r: r.start_s)
        t = np.array([r.start_s for r in recs])
        kinds = np.array([outcome_of(r) for r in recs])
        ax = axes[0, j]
        bottom = np.zeros(max(len(edges) - 1, 0))
        for key, name, color, hatch in OUTCOMES:
            counts, _ = np.histogram(t[kinds == key], bins=edges)
            ax.bar(edges[:-1], counts / width, width=width, bottom=bottom, align="edge", color=color, hatch=hatch,
                   edgecolor="white", linewidth=0.3, label=name, gid=f"outcomes:{label}:{key}")
            bottom += counts / width
        top = max(top, float(bottom.max()) if len(bottom) else 0.0)
        counts = ", ".join(f"{int((kinds == k).sum())} {SHORT[k]}" for k, *_ in OUTCOMES if (kinds == k).any())
        axes[0, j].set_title(_wrap(f"{label}: {len(recs)} requests, {counts}", COLUMN_WIDTH_IN, 9), fontsize=9)
        ax = axes[1, j]
        n = np.arange(1, len(recs) + 1)
        ax.plot(t, 100 * np.cumsum(kinds == "solved") / n, color="tab:green", label="accuracy so far (solved / sent)",
                gid=f"accuracy:{label}")
        ax.plot(t, 100 * np.cumsum(kinds == "abandoned") / n, color="tab:red", linestyle="--",
                label="429 share so far (429 / sent)", gid=f"rate429:{label}")
        ax = axes[2, j]
        ok = kinds == "solved"
        ok |= kinds == "unsolved"
        lat = np.array([r.latency_s for r in recs])
        ax.scatter(t[ok], lat[ok], s=7, alpha=0.5, color="tab:blue", linewidths=0, label="answered", zorder=2,
                   gid=f"latency:{label}:answered")
        ab = kinds == "abandoned"
        ax.scatter(t[ab], lat[ab], s=16, marker="x", color="tab:red", linewidths=0.9, label="429 (answered at once)",
                   zorder=3, gid=f"latency:{label}:abandoned")
        if (lat[ok | ab] > 0).any():
            ax.set_yscale("log")
    axes[0, 0].set_ylim(0, max(top, 1e-9) * 1.08)  # the tallest stack below the top edge (the row shares y)
    axes[0, 0].set_ylabel("requests / s by outcome")
    axes[1, 0].set_ylabel("share of requests sent (%)")
    axes[2, 0].set_ylabel("end-to-end latency (s, log)")
    for i in range(3):
        found: dict = {}
        _collect(axes[i], found)
        _legend_right(axes[i, -1], found)
    _title(fig, f"Load test: what the clients saw (bins of {width:g} s)")
    return fig


def _series(samples: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(s["t_s"], s[key]) for s in samples if isinstance(s.get(key), (int, float)) and "t_s" in s]
    if not pts:
        return np.array([]), np.array([])
    t, v = np.array(pts, dtype=float).T
    return t, v


def _pool_view(sample: dict) -> dict:
    """A status sample with the caps in flight counted wherever they are reserved (centrally or in leases)."""
    out = dict(sample)
    if isinstance(sample.get("reserved_tokens"), (int, float)):
        out["reserved_all_tokens"] = sample["reserved_tokens"] + (sample.get("lease_reserved_tokens") or 0)
    if isinstance(sample.get("leased_tokens"), (int, float)):
        out["leased_idle_tokens"] = sample["leased_tokens"] - (sample.get("lease_reserved_tokens") or 0)
    return out


def _no_status(ax, label: str) -> None:
    ax.text(0.5, 0.5, f"no /v1/clear/status samples for {label}", transform=ax.transAxes, ha="center", va="center",
            fontsize=8, color="0.4", gid="no-status")


def allocator_figure(runs: Mapping[str, Sequence[RequestRecord]], statuses: Mapping[str, Sequence[dict]]):
    """What the allocator did: shadow price, abandonment (429 rate), the budget pool and the books, over time."""
    plt = _plt()
    labels = list(runs)
    fig, axes = _grid(plt, 4, labels, 2.6)
    edges = _bins(runs)
    width = float(edges[1] - edges[0]) if len(edges) > 1 else 1.0
    for j, label in enumerate(labels):
        recs = sorted(runs[label], key=lambda r: r.start_s)
        samples = sorted(statuses.get(label) or [], key=lambda s: s.get("t_s", 0.0))
        # 1. the shadow price each response carried, and the allocator's own
        # (answers as hollow circles, the polled price as a thin line over them, 429s as crosses on top:
        # where they agree each stays visible)
        ax = axes[0, j]
        t, v = _series(samples, "shadow_price")
        if len(t):
            ax.step(t, v, where="post", color="black", linewidth=0.9, zorder=2.5,
                    label="polled /v1/clear/status shadow price", gid=f"price:{label}:status")
        for status, kw in (("ok", dict(s=16, facecolors="none", edgecolors="tab:blue", linewidths=0.8, zorder=2,
                                       label="price in an answer (clear.shadow_price)")),
                           ("abandoned", dict(s=18, marker="x", color="tab:red", linewidths=0.9, zorder=3,
                                              label="price in a 429 (error.shadow_price)"))):
            pts = [(r.start_s, r.shadow_price) for r in recs if r.status == status and r.shadow_price is not None]
            arr = np.array(pts, dtype=float).reshape(-1, 2)
            ax.scatter(arr[:, 0], arr[:, 1], gid=f"price:{label}:{status}", **kw)
        if not len(t) and not any(r.shadow_price is not None for r in recs):
            ax.text(0.5, 0.5, "no shadow price recorded (the policy sets none)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="0.4")
        # 2. abandonment: the clients' 429 share per bin, and the allocator's rate over its last decisions
        ax = axes[1, j]
        t_arr = np.array([r.start_s for r in recs])
        ab = np.array([r.status == "abandoned" for r in recs], bool)
        sent, _ = np.histogram(t_arr, bins=edges)
        got, _ = np.histogram(t_arr[ab], bins=edges)
        share = np.divide(100.0 * got, sent, out=np.full(len(sent), np.nan), where=sent > 0)
        ax.bar(edges[:-1], np.nan_to_num(share), width=width, align="edge", color="tab:red", alpha=0.35,
               edgecolor="tab:red", linewidth=0.5, label=f"429 share of arrivals per {width:g} s",
               gid=f"abandon:{label}:bins")
        t, v = _series(samples, "abandonment_rate")
        if len(t):
            window = next((s.get("abandonment_window_requests") for s in samples
                           if s.get("abandonment_window_requests")), None)
            ax.plot(t, 100 * v, color="black", marker=".", markersize=3, linewidth=1.1,
                    label="allocator's abandonment rate" + (f" (last {window} decisions)" if window else ""),
                    gid=f"abandon:{label}:status")
        if not ab.any():
            ax.text(0.5, 0.6, "no 429s in this run", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                    color="0.4")
        # 3. the pool now: what a new cap may take, and what in-flight caps hold (with decisions at the
        # ingress, caps are reserved inside the replicas' budget leases, and the pool lends the leases)
        ax = axes[2, j]
        if samples:
            pool = [_pool_view(s) for s in samples]
            leases = any(s.get("leased_idle_tokens") for s in pool)
            for key, name, style in (("available_tokens", "available (the pool)", dict(color="tab:green", linestyle="-")),
                                     ("reserved_all_tokens", "reserved (in-flight caps)",
                                      dict(color="tab:purple", linestyle="--")),
                                     ("leased_idle_tokens", "leased to ingress replicas, not reserved",
                                      dict(color="tab:orange", linestyle=":"))):
                if key == "leased_idle_tokens" and not leases:
                    continue
                t, v = _series(pool, key)
                ax.plot(t, v, marker=".", markersize=3, linewidth=1.2, label=name, gid=f"pool:{label}:{key}", **style)
        else:
            _no_status(ax, label)
        # 4. the books: granted, spent, allocated and generated so far
        ax = axes[3, j]
        if samples:
            for key, name, style in (
                ("granted_tokens", "granted (budget credited)", dict(color="black", linestyle="-")),
                ("allocated_tokens_total", "allocated (sum of caps)", dict(color="tab:blue", linestyle="--")),
                ("spent_tokens", "spent (charged)", dict(color="tab:red", linestyle="-.")),
                ("generated_tokens_total", "generated", dict(color="tab:green", linestyle=":")),
            ):
                t, v = _series(samples, key)
                if len(t):
                    ax.plot(t, v, linewidth=1.4, label=name, gid=f"books:{label}:{key}", **style)
        else:
            _no_status(ax, label)
    axes[0, 0].set_ylabel("shadow price λ\n(utility per token)")
    axes[1, 0].set_ylabel("abandonment (%)")
    axes[2, 0].set_ylabel("budget pool (tokens)")
    axes[3, 0].set_ylabel("tokens so far")
    for i in range(4):
        found: dict = {}
        _collect(axes[i], found)
        _legend_right(axes[i, -1], found)
    _title(fig, "Load test: the allocator over time (shadow price, abandonment, budget)")
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_over_time(runs: Mapping[str, Sequence[RequestRecord]], path: Path) -> Path:
    return _save(over_time_figure(runs), path)


def plot_allocator_over_time(runs: Mapping[str, Sequence[RequestRecord]], statuses: Mapping[str, Sequence[dict]],
                             path: Path) -> Path:
    return _save(allocator_figure(runs, statuses), path)


def write_figures(out: Path, runs: Mapping[str, Sequence[RequestRecord]],
                  statuses: Mapping[str, Sequence[dict]]) -> list[Path]:
    return [plot_over_time(runs, out / "over_time.png"),
            plot_allocator_over_time(runs, statuses, out / "allocator_over_time.png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.report",
                                description="Draw a recorded load test's figures (over_time.png, allocator_over_time.png).")
    p.add_argument("--results", nargs="+", type=Path, required=True,
                   help=f"LABEL{RECORDS_SUFFIX} files, or directories holding them (a LABEL{STATUS_SUFFIX} "
                   "beside a records file is read too)")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    args = p.parse_args(argv)
    try:
        runs, statuses = load_results(args.results)
    except FileNotFoundError as exc:
        p.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write_figures(args.out, runs, statuses):
        print(f"wrote {path}")
    wall = {k: max((r.start_s + r.latency_s for r in v), default=0.0) for k, v in runs.items()}
    print(side_by_side({k: summarize(v, wall[k]) for k, v in runs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
