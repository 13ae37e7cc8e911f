"""The paper's figures on our pools (matplotlib, PNG): Figs. 5-8 and 11.

Every figure is built by a ``*_figure`` function that returns the matplotlib
``Figure`` (what the tests inspect) and saved by its namesake. The rules they
share, so that no data hides:

* series that would coincide get distinct markers *and* line styles, hollow
  markers of decreasing size (earlier series ring the later ones), and a
  footnote under the axes names every pair that overlaps and where;
* the category that would be covered is drawn on top, with its own marker;
* legends sit outside the axes, titles are wrapped to the figure's width, and
  the layout is matplotlib's constrained layout, so no text leaves the figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from clear_bench.report import aggregate  # noqa: E402

DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1.5)), (0, (3, 1, 1, 1, 1, 1)))
TITLE_FONTSIZE = 11.0
# Two points overlap on screen when they are closer than this share of the y axis's data range.
OVERLAP_SHARE = 0.005


def wrap_title(text: str, fig_width_in: float, fontsize: float = TITLE_FONTSIZE) -> str:
    """``text`` wrapped so that each line fits a figure ``fig_width_in`` inches wide.

    A character of DejaVu Sans is at most about 0.62 em wide on average over
    words; the margin keeps a line inside the figure whatever its letters.
    """
    chars = max(20, int(fig_width_in * 72.0 / (0.62 * fontsize)) - 4)
    return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _suptitle(fig: Figure, text: str) -> None:
    fig.suptitle(wrap_title(text, fig.get_figwidth()), fontsize=TITLE_FONTSIZE)


def _footnote(ax, lines: Sequence[str], fig_width_in: float) -> None:
    """Text under ``ax``'s x label; constrained layout makes room for it."""
    if not lines:
        return
    chars = max(30, int(fig_width_in * 72.0 / (0.62 * 8.0)) - 8)
    text = "\n".join(textwrap.fill(line, chars) for line in lines)
    ax.annotate(text, xy=(0.0, 0.0), xycoords="axes fraction", xytext=(0, -32), textcoords="offset points",
                va="top", ha="left", fontsize=8, color="0.25", annotation_clip=False, gid="footnote")


def _fmt(x: float) -> str:
    return f"{x:g}"


def overlaps(xs: Sequence[float], series: Mapping[str, Sequence[float]],
             share: float = OVERLAP_SHARE) -> list[tuple[tuple[str, ...], list[float]]]:
    """Groups of series whose points coincide on screen, and the x values where they do.

    At each x, series closer than ``share`` of the y data range are linked
    (transitively); each group of two or more is reported with every x where
    exactly that group coincides.
    """
    names = list(series)
    values = [np.asarray(v, dtype=float) for v in series.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    span = float(np.ptp(finite)) if finite.size else 0.0
    tol = share * span if span > 0 else 1e-12
    where: dict[tuple[str, ...], list[float]] = {}
    for k, x in enumerate(xs):
        parent = list(range(len(names)))

        def root(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                a, b = values[i][k], values[j][k]
                if np.isfinite(a) and np.isfinite(b) and abs(a - b) <= tol:
                    parent[root(j)] = root(i)
        groups: dict[int, list[str]] = {}
        for i, name in enumerate(names):
            groups.setdefault(root(i), []).append(name)
        for members in groups.values():
            if len(members) > 1:
                where.setdefault(tuple(members), []).append(float(x))
    return list(where.items())


def _and(names: Sequence[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def overlap_notes(xs: Sequence[float], series: Mapping[str, Sequence[float]], xname: str = "x") -> list[str]:
    found = overlaps(xs, series)
    if not found:
        return []
    notes = [f"Overlapping points (closer than {100 * OVERLAP_SHARE:g}% of the y range; told apart by marker "
             "shape and size and by line style):"]
    for names, where in found:
        at = "every point" if len(where) == len(xs) else f"{xname} = " + ", ".join(_fmt(x) for x in where)
        notes.append(f"  {_and(names)} at {at}.")
    return notes


def lines_figure(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    styles: Mapping[str, Mapping] | None = None,
    notes: Sequence[str] = (),
    xname: str = "x",
) -> Figure:
    """Lines that stay visible where they coincide; the overlaps are named in a footnote."""
    fig, ax = plt.subplots(figsize=(8.5, 5.0), layout="constrained")
    n = len(series)
    for i, (label, ys) in enumerate(series.items()):
        style = {
            "color": f"C{i % 10}",
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        } | dict((styles or {}).get(label, {}))
        # Hollow markers, the first series' largest: markers that coincide show as rings around each other.
        ms = 5.0 + 1.6 * (n - 1 - i)
        ax.plot(xs, ys, label=label, markersize=ms, markerfacecolor="none", markeredgewidth=1.4, linewidth=1.5,
                zorder=2 + i, gid=f"series:{label}", **style)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _suptitle(fig, title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    _footnote(ax, [*notes, *overlap_notes(xs, series, xname)], fig.get_figwidth())
    return fig


def lines_plot(
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    out: Path,
    name: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    **kw,
) -> Path:
    """A line plot used by the noise, beta and alpha figures (see :func:`lines_figure`)."""
    fig = lines_figure(xs, series, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, **kw)
    return _save(fig, out / name)


# -- Fig. 5: the phase transition ------------------------------------------------------

POLICY_STYLE = {
    "uniform": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "clear-paper": {"color": "tab:orange", "marker": "s", "linestyle": "--"},
    "clear": {"color": "tab:green", "marker": "^", "linestyle": "-"},
    "clear-cost": {"color": "tab:red", "marker": "D", "linestyle": "-."},
}
ORACLE = "oracle"


def phase_transition_figure(rows: Sequence[dict], policies=("uniform", "clear-paper", "clear", "clear-cost")) -> Figure:
    """Accuracy and abandonment rate vs budget per stream, under the oracle's accuracy (Fig. 5)."""
    acc = aggregate(rows, "accuracy")
    ab = aggregate(rows, "abandonment_rate")
    streams = sorted({k[0] for k in acc})
    budgets = sorted({k[1] for k in acc})
    fig, axes = plt.subplots(2, len(streams), figsize=(4.2 * len(streams), 7.0), squeeze=False, sharex=True,
                             layout="constrained")
    have_oracle = any(k[2] == ORACLE for k in acc)
    for j, stream in enumerate(streams):
        top, bottom = axes[0, j], axes[1, j]
        if have_oracle:
            bs = [b for b in budgets if (stream, b, ORACLE) in acc]
            ys = [100 * acc[(stream, b, ORACLE)][0] for b in bs]
            # A wide pale band under a thin dashed line: a policy point on the ceiling stays visible on top.
            top.plot(bs, ys, color="0.6", linewidth=6, alpha=0.35, zorder=1, solid_capstyle="round")
            top.plot(bs, ys, color="black", linestyle=(0, (4, 2)), linewidth=1.2, marker="_", markersize=10,
                     zorder=1.5, label="oracle (ceiling)", gid=f"oracle:{stream}")
        for i, p in enumerate(policies):
            bs = [b for b in budgets if (stream, b, p) in acc]
            if not bs:
                continue
            style = POLICY_STYLE.get(p, {"color": f"C{3 + i}", "marker": MARKERS[i], "linestyle": LINESTYLES[i]})
            top.errorbar(bs, [100 * acc[(stream, b, p)][0] for b in bs], yerr=[100 * acc[(stream, b, p)][1] for b in bs],
                         capsize=3, markerfacecolor="none", markersize=7, label=p, zorder=3 + i, **style)
            bottom.plot(bs, [100 * ab[(stream, b, p)][0] for b in bs], markerfacecolor="none", markersize=7, label=p,
                        zorder=3 + i, gid=f"abandonment:{stream}:{p}", **style)
        top.set_title(stream)
        bottom.set_xlabel("budget per query (tokens)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[1, 0].set_ylabel("abandonment rate (% of queries)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    title = "Phase transition: accuracy (mean ± std over seeds) and abandonment vs budget"
    if not have_oracle:
        title += " (no oracle ceiling: the run did not include the oracle policy)"
    _suptitle(fig, title)
    return fig


def phase_transition(rows: Sequence[dict], out: Path, policies=("uniform", "clear-paper", "clear", "clear-cost")) -> Path:
    return _save(phase_transition_figure(rows, policies), out / "phase_transition.png")


# -- Fig. 6: one allocation -------------------------------------------------------------

OUTCOMES = (  # (key, label, color): the order of the stacked histogram, bottom first
    ("solved", "solved", "tab:green"),
    ("cut", "cut by its cap (cap < length)", "tab:orange"),
    ("wrong", "finished, wrong answer", "tab:purple"),
    ("abandoned", "abandoned (cap 0)", "tab:red"),
)


def allocation_outcomes(caps, tokens, correct) -> dict[str, np.ndarray]:
    """Boolean masks of the four outcomes of an allocation; they partition the queries."""
    caps, tokens, correct = np.asarray(caps), np.asarray(tokens), np.asarray(correct, bool)
    admitted = caps > 0
    fits = caps >= tokens
    return {
        "solved": admitted & fits & correct,
        "cut": admitted & ~fits,
        "wrong": admitted & fits & ~correct,
        "abandoned": ~admitted,
    }


def allocation_scatter_figure(thresholds, caps, tokens, correct, title: str) -> Figure:
    """Predicted threshold vs cap of the admitted queries, and every query's outcome by threshold (Fig. 6)."""
    thresholds, caps = np.asarray(thresholds, float), np.asarray(caps, float)
    masks = allocation_outcomes(caps, tokens, correct)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(8.5, 7.0), sharex=True, height_ratios=(3, 1.4),
                                   layout="constrained")
    style = {
        # solved underneath (the many), the unsolved on top with their own markers
        "solved": dict(s=14, marker="o", alpha=0.45, linewidths=0, zorder=2),
        "cut": dict(s=30, marker="v", facecolors="none", linewidths=1.1, zorder=4),
        "wrong": dict(s=30, marker="D", facecolors="none", linewidths=1.1, zorder=5),
    }
    colors = {k: c for k, _, c in OUTCOMES}
    names = {k: lab for k, lab, _ in OUTCOMES}
    for key in ("solved", "cut", "wrong"):
        m = masks[key]
        kw = dict(style[key])
        color_kw = {"edgecolors": colors[key]} if kw.get("facecolors") == "none" else {"c": colors[key]}
        ax.scatter(thresholds[m], caps[m], label=f"{names[key]} ({int(m.sum())})", gid=f"scatter:{key}",
                   **color_kw, **kw)
    admitted = ~masks["abandoned"]
    lo = max(1.0, float(thresholds.min()))
    hi = float(max(thresholds.max(), caps.max(), 2.0))
    top = float(max(caps.max(), 2.0)) * 1.5  # the diagonal up to the caps, so the caps fill the panel
    ax.plot([lo, min(hi, top)], [lo, min(hi, top)], "k--", lw=0.8, zorder=1, label="cap = predicted threshold")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("cap of an admitted query (tokens)")
    ax.grid(alpha=0.3)
    ab = int(masks["abandoned"].sum())
    ax.text(0.99, 0.02, f"{int(admitted.sum())} admitted, {ab} abandoned (cap 0: in the lower panel only)",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.3")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)

    edges = np.geomspace(lo, max(hi, lo * 1.01), 31)
    clipped = np.clip(thresholds, edges[0], edges[-1])
    bottom = np.zeros(len(edges) - 1)
    for key, label, color in OUTCOMES:
        counts, _ = np.histogram(clipped[masks[key]], bins=edges)
        hist.bar(edges[:-1], counts, width=np.diff(edges), bottom=bottom, align="edge", color=color,
                 edgecolor="white", linewidth=0.4, label=f"{label} ({int(masks[key].sum())})", gid=f"hist:{key}",
                 hatch="xx" if key == "abandoned" else None)
        bottom += counts
    hist.set_ylim(0, max(1.0, float(bottom.max())) * 1.08)  # the tallest stack below the top edge
    hist.set_xlabel("predicted threshold (tokens)")
    hist.set_ylabel("queries")
    hist.grid(alpha=0.3, axis="y")
    hist.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    _suptitle(fig, title)
    return fig


def allocation_scatter(thresholds, caps, tokens, correct, out: Path, title: str) -> Path:
    return _save(allocation_scatter_figure(thresholds, caps, tokens, correct, title), out / "allocation_scatter.png")
