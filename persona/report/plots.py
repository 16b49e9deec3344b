"""The report's plots: matplotlib figures, each returned as one inline ``<svg>`` element.

No pyplot and no global backend: each figure is a :class:`matplotlib.figure.Figure` with its own SVG
canvas, so a server can render reports in several threads at once and a user's pyplot state is left
alone. Only this module imports matplotlib, and only ``html.py`` imports it, when a report is rendered.

SVG ids (markers, glyphs, clip paths) get a prefix per figure: several figures inline in one HTML
document share one id namespace, and a reference to another figure's id would draw the wrong thing.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib import colormaps
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .collect import AdapterReport, Report

if TYPE_CHECKING:
    from ..training.matrix import LossMatrix

__all__ = [
    "figure_svg",
    "forgetting_figure",
    "gain_figure",
    "lineage_figure",
    "matrix_figure",
    "timeline_figure",
    "user_forgetting",
    "user_gain",
]

GOOD, BAD, NEUTRAL, BEFORE, REPLAY = "#2a9d5c", "#d1495b", "#8d99ae", "#4361ee", "#f4a261"
MANY = 40  # more adapters than this: a histogram instead of one labelled row each
# matplotlib's SVG metadata (an RDF block naming purl.org and creativecommons.org URLs) left out.
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}
_ID = re.compile(r'\bid="([^"]+)"')
_COMMENT = re.compile(r"<!--.*?-->\n?", re.DOTALL)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def figure_svg(fig: Figure, prefix: str, title: str = "") -> str:
    """``fig`` as one ``<svg>`` element for inline HTML: no XML prolog or DOCTYPE, ids prefixed by
    ``prefix``, ``role="img"`` with ``title`` as its accessible name."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    # from <svg on: no XML prolog or DOCTYPE inside HTML; and without the comments in which matplotlib
    # repeats the text of every label it drew as paths (bytes no reader sees)
    text = _COMMENT.sub("", text[text.index("<svg"):])
    ids = set(_ID.findall(text))
    if ids:
        # one pass over every id, its definition and its references (#id in href and url())
        pattern = re.compile(r'(id="|#)(' + "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True))
                             + r')(?=["\)])')
        text = pattern.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(title, quote=True)}" ', 1).strip()


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _plain(text: str) -> str:
    """Text matplotlib draws as it is: a ``$`` would start mathtext."""
    return text.replace("$", r"\$")


# ---------------------------------------------------------------------------------------------- per adapter
def timeline_figure(adapter: AdapterReport) -> Figure | None:
    """Held-out and replay loss before -> after each update, the gate's verdict above, rows trained below.

    None when no version of the adapter was made by an update."""
    points = adapter.timeline
    if not adapter.updates:
        return None
    fig = _figure(max(5.0, min(16.0, 1.0 + 0.7 * len(points))), 4.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    xs = list(range(len(points)))
    for x, p in zip(xs, points):
        for before, after, color, dx in ((p.heldout_before, p.heldout_after, BEFORE, -0.08),
                                         (p.replay_before, p.replay_after, REPLAY, 0.08)):
            if before is not None and after is not None:
                top.annotate("", xy=(x + dx, after), xytext=(x + dx, before),
                             arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5})
            if before is not None:
                top.plot([x + dx], [before], marker="o", mfc="white", mec=color, ls="none")
            if after is not None:
                top.plot([x + dx], [after], marker="o", color=color, ls="none")
        if p.promoted is not None:
            mark, color = ("\u2713", GOOD) if p.promoted else ("\u2717", BAD)
            top.text(x, 1.02, mark + (" forced" if p.forced else ""), color=color, ha="center", va="bottom",
                     transform=top.get_xaxis_transform(), fontsize=11)
    after_x = [x for x, p in zip(xs, points) if p.heldout_after is not None]
    top.plot(after_x, [points[x].heldout_after for x in after_x], color=BEFORE, lw=0.8, alpha=0.5)
    top.plot([], [], marker="o", color=BEFORE, ls="-", label="held-out loss (new data), before -> after")
    top.plot([], [], marker="o", color=REPLAY, ls="-", label="replay loss (old data): a rise is forgetting")
    top.legend(loc="best", fontsize=8, frameon=False)
    top.set_ylabel("loss per token")
    top.grid(axis="y", alpha=0.3)
    top.set_xlim(-0.6, len(points) - 0.4)
    rows = [p.rows_trained or 0 for p in points]
    bottom.bar(xs, rows, color=[NEUTRAL if p.origin == "update" else "#e9ecef" for p in points], width=0.5)
    bottom.set_ylabel("rows trained", fontsize=8)
    bottom.set_xticks(xs, [_plain(p.label + ("\n" + p.origin if p.origin != "update" else "")) for p in points],
                      fontsize=8)
    for tick, p in zip(bottom.get_xticklabels(), points):
        if p.promoted is False:
            tick.set_color(BAD)
    return fig


def matrix_figure(matrix: LossMatrix) -> Figure | None:
    """R as a heat map: rows the base and each version, columns the kept held-out slices; each
    column's own version (the diagonal of GEM's matrix) outlined. None without a kept column."""
    if not matrix.columns:
        return None
    rows, cols = len(matrix.rows), len(matrix.columns)
    fig = _figure(max(4.0, min(14.0, 2.2 + 0.9 * cols)), max(2.6, min(12.0, 1.0 + 0.38 * rows)))
    ax = fig.subplots()
    values = [[v if not math.isnan(v) else float("nan") for v in row] for row in matrix.losses]
    finite = [v for row in values for v in row if not math.isnan(v)]
    norm = Normalize(min(finite), max(finite)) if finite else Normalize(0, 1)
    image = ax.imshow(values, cmap=colormaps["viridis_r"].with_extremes(bad="#dddddd"), norm=norm, aspect="auto")
    ax.set_xticks(range(cols), [_plain(c) for c in matrix.columns], fontsize=8)
    ax.set_yticks(range(rows), [_plain(r) for r in matrix.rows], fontsize=8)
    ax.set_xlabel("held-out slice kept by the update that made version")
    ax.set_ylabel("scored with")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    if rows * cols <= 160:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                text = "-" if math.isnan(v) else f"{v:.3f}"
                shade = "white" if not math.isnan(v) and norm(v) > 0.6 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=shade)
    for j, column in enumerate(matrix.columns):
        i = matrix.rows.index(column)
        ax.add_patch(FancyBboxPatch((j - 0.5, i - 0.5), 1, 1, boxstyle="square,pad=0", fill=False, lw=1.5,
                                    ec=BAD))
    fig.colorbar(image, ax=ax, label="loss per token (lower is better)", shrink=0.9)
    return fig


def lineage_figure(adapter: AdapterReport) -> Figure | None:
    """The adapter's versions left to right (parent arrows; a branch after a refused candidate arcs
    over it) and, above, the other adapters' versions it was merged from, copied from or layered on."""
    points = adapter.timeline
    if not points:
        return None
    column = {p.label: i for i, p in enumerate(points)}
    external = [e for e in adapter.lineage if not e.internal]
    sources: dict[str, float] = {}
    for edge in sorted(external, key=lambda e: column.get(e.target, 0)):
        if edge.source not in sources:
            wanted = column.get(edge.target, 0)
            sources[edge.source] = max([wanted] + [x + 2.2 for x in sources.values()])
    left = min([-0.6] + [x - 1.1 for x in sources.values()])
    right = max([len(points) - 0.4] + [x + 1.1 for x in sources.values()])
    top = 1.65 if sources else 0.45
    # one data unit is about an inch, so boxes keep their shape whatever the number of versions
    fig = _figure(max(2.0, min(16.0, right - left)), (top + 0.55) * 0.8)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_xlim(left, right)
    ax.set_ylim(-0.55, top)
    current = adapter.aliases.get("current")
    for i, p in enumerate(points):
        names = ", ".join(p.aliases)
        color = GOOD if p.version == current else (BAD if p.promoted is False else NEUTRAL)
        ax.add_patch(FancyBboxPatch((i - 0.38, -0.3), 0.76, 0.6, boxstyle="round,pad=0.02", fc="white", ec=color,
                                    lw=2 if p.version == current else 1, ls="--" if p.promoted is False else "-"))
        ax.text(i, 0.06 if names else 0, _plain(p.label), ha="center", va="center", fontsize=8)
        if names:
            ax.text(i, -0.16, _plain(names), ha="center", va="center", fontsize=6, color=color)
    for edge in adapter.lineage:
        if edge.target not in column:
            continue
        j = column[edge.target]
        if edge.internal:
            if edge.source not in column:
                continue
            i = column[edge.source]
            if j == i + 1:
                arrow = FancyArrowPatch((i + 0.38, 0), (j - 0.38, 0), arrowstyle="-|>", mutation_scale=10,
                                        color="#555555")
            else:  # a branch: the new version grew from an older one than its left neighbour
                arrow = FancyArrowPatch((i, -0.3), (j, -0.3), arrowstyle="-|>", mutation_scale=10, color="#555555",
                                        connectionstyle="arc3,rad=0.35")
            ax.add_patch(arrow)
            continue
        x = sources[edge.source]
        color = {"merge": BEFORE, "over": REPLAY}.get(edge.relation, NEUTRAL)
        ax.add_patch(FancyArrowPatch((x, 1.0), (j, 0.3), arrowstyle="-|>", mutation_scale=10, color=color))
        label = _short(edge.relation + (f" ({edge.detail})" if edge.detail else ""), 36)  # in full below the figure
        ax.text((x + j) / 2 + 0.05, 0.65, _plain(label), fontsize=6, color=color, ha="left", va="center",
                in_layout=False)
    for source, x in sources.items():
        ax.add_patch(FancyBboxPatch((x - 1.0, 1.0), 2.0, 0.5, boxstyle="round,pad=0.02", fc="#f8f9fa", ec="#555555"))
        ax.text(x, 1.25, _plain(source), ha="center", va="center", fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------- across adapters
def user_gain(adapter: AdapterReport, from_matrix: bool) -> float | None:
    """``from_matrix``: the final version's gain over the base, averaged over every kept slice up to it;
    else the mean held-out improvement of its promoted updates over their parents (``meta.json``)."""
    m = adapter.matrix
    if from_matrix:
        if m is None or not m.columns:
            return None
        base, final = m.losses[0], m.losses[m.rows.index(m.final)]
        gains = [b - f for b, f in zip(base, final) if not (math.isnan(b) or math.isnan(f))]
        return sum(gains) / len(gains) if gains else None
    gains = [p.improvement for p in adapter.updates if p.promoted and p.improvement is not None]
    return sum(gains) / len(gains) if gains else None


def user_forgetting(adapter: AdapterReport) -> list[float]:
    """Each update's replay loss rise (``forgetting`` in ``meta.json``; positive = forgot)."""
    return [p.forgetting for p in adapter.updates if p.forgetting is not None and p.replay_before is not None]


def _by_user(ax, names: Sequence[str], values: Sequence[float], xlabel: str, *, lower_is_better: bool = False) -> None:
    """One labelled bar per adapter (green on the good side of 0, red on the bad one), or a histogram when
    there are many."""
    if len(names) > MANY:
        ax.hist(values, bins=min(40, max(10, len(values) // 5)), color=NEUTRAL)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("adapters")
        return
    order = sorted(range(len(names)), key=lambda k: values[k])
    ax.barh(range(len(order)), [values[k] for k in order],
            color=[GOOD if (values[k] <= 0) == lower_is_better or values[k] == 0 else BAD for k in order], height=0.6)
    ax.set_yticks(range(len(order)), [_plain(names[k]) for k in order], fontsize=8)
    ax.axvline(0, color="#555555", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def gain_figure(report: Report) -> Figure | None:
    """Gain over the base per adapter (:func:`user_gain`, from the matrix when any adapter has one, so that
    one plot never mixes two measures); None when no adapter has one."""
    from_matrix = any(a.matrix is not None and a.matrix.columns for a in report.adapters)
    pairs = [(a.adapter, g) for a in report.adapters if (g := user_gain(a, from_matrix)) is not None]
    if not pairs:
        return None
    fig = _figure(6.5, max(2.2, min(12.0, 0.8 + 0.3 * min(len(pairs), MANY))))
    ax = fig.subplots()
    label = ("gain over the base on its kept slices (loss per token; positive = better than the base)" if from_matrix
             else "mean held-out improvement per promoted update (loss per token)")
    _by_user(ax, [n for n, _ in pairs], [g for _, g in pairs], label)
    return fig


def forgetting_figure(report: Report) -> Figure | None:
    """BWT per adapter (matrix) and the largest replay loss rise of its updates (``meta.json``)."""
    bwt = [(a.adapter, a.matrix.bwt) for a in report.adapters if a.matrix is not None and a.matrix.bwt is not None]
    rise = [(a.adapter, max(f)) for a in report.adapters if (f := user_forgetting(a))]
    panels = [p for p in (bwt, rise) if p]
    if not panels:
        return None
    tallest = max(len(p) for p in panels)
    fig = _figure(6.5 * len(panels), max(2.2, min(12.0, 0.8 + 0.3 * min(tallest, MANY))))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    k = 0
    if bwt:
        _by_user(axes[k], [n for n, _ in bwt], [v for _, v in bwt], "BWT (negative = forgetting)")
        k += 1
    if rise:
        _by_user(axes[k], [n for n, _ in rise], [v for _, v in rise],
                 "largest replay loss rise of an update (positive = forgot)", lower_is_better=True)
    return fig
