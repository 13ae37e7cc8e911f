"""Checks shared by the figure tests: what a figure draws, and that nothing leaves it or covers the data."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.text import Text


def by_gid(fig: Figure, gid: str) -> list:
    found = fig.findobj(lambda a: a.get_gid() == gid)
    assert found, f"nothing drawn with gid {gid!r}"
    return found


def assert_text_inside(fig: Figure) -> None:
    """Everything drawn (axes with their tick labels, labels, titles, legends, footnotes; the
    figure's title, texts and legends) lies inside the figure, measured by the renderer."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    parts = [(f"axes {i}", ax.get_tightbbox(renderer)) for i, ax in enumerate(fig.axes)]
    title = [t for t in fig.findobj(Text) if t.get_text() and t.get_text() == fig.get_suptitle()]
    assert title, "the figure has a title"
    figure_texts = title + [t for t in fig.texts if t.get_text()]
    parts += [(f"text {t.get_text()[:50]!r}", t.get_window_extent(renderer)) for t in figure_texts]
    parts += [(f"figure legend {i}", leg.get_window_extent(renderer)) for i, leg in enumerate(fig.legends)]
    for name, ext in parts:
        assert (ext.x0 >= box.x0 - 0.5 and ext.x1 <= box.x1 + 0.5 and ext.y0 >= box.y0 - 0.5
                and ext.y1 <= box.y1 + 0.5), f"{name} leaves the figure: {ext} vs {box}"


def assert_legends_off_the_data(fig: Figure) -> None:
    """No legend overlaps the plotting area of any axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends, "the figure has a legend"
    for leg in legends:
        lb = leg.get_window_extent(renderer)
        for ax in fig.axes:
            ab = ax.get_window_extent(renderer)
            overlap_w = min(lb.x1, ab.x1) - max(lb.x0, ab.x0)
            overlap_h = min(lb.y1, ab.y1) - max(lb.y0, ab.y0)
            assert overlap_w <= 0.5 or overlap_h <= 0.5, "a legend covers a plotting area"


def assert_titles_apart(fig: Figure) -> None:
    """No two axes titles overlap (long column titles of neighbouring panels run into each other)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert w <= 0.5 or h <= 0.5, f"titles {fig.axes[i].get_title()!r} and {fig.axes[j].get_title()!r} overlap"
