"""A :class:`~persona.report.collect.Report` as HTML: a whole self-contained document, or the inner
fragment the server's dashboard embeds in its own page.

Self-contained means no fetch of any kind: plots are inline ``<svg>``, the one ``<style>`` is inline,
there is no script, and the document's Content-Security-Policy forbids loading anything (so a stray
reference could not phone home even if one slipped in). Every string that comes from the store
(adapter names, aliases, gate reasons, lineage entries, paths) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

from .collect import AdapterReport, Report, TimelinePoint

__all__ = ["render_report", "render_report_body"]

STYLE = """
.persona-report{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#212529;max-width:72rem;margin:0 auto;
  padding:0 1rem;line-height:1.4}
.persona-report h1{font-size:1.6rem;margin:1rem 0 .3rem}
.persona-report h2{font-size:1.3rem;border-bottom:1px solid #dee2e6;padding-bottom:.2rem;margin-top:2rem}
.persona-report h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
.persona-report .meta,.persona-report figcaption,.persona-report .note{color:#6c757d;font-size:.85rem}
.persona-report figure{margin:.5rem 0;overflow-x:auto}
.persona-report svg{max-width:100%;height:auto}
.persona-report table{border-collapse:collapse;font-size:.82rem;margin:.4rem 0}
.persona-report th,.persona-report td{border:1px solid #dee2e6;padding:.2rem .45rem;text-align:left;vertical-align:top}
.persona-report th{background:#f8f9fa}
.persona-report td.num{text-align:right;font-variant-numeric:tabular-nums}
.persona-report .refused{color:#b02a37}
.persona-report .promoted{color:#1e7b47}
.persona-report .damaged{background:#fff3cd;padding:.4rem .6rem;border-left:4px solid #d1495b}
.persona-report nav a{margin-right:.8rem}
"""

# The document may load nothing: inline styles only (for the <style> element and SVG attributes).
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def anchor(adapter: str) -> str:
    """The HTML id of an adapter's section: ``user:alice`` -> ``adapter-user-alice`` (names are ``[a-z0-9._-]``)."""
    return "adapter-" + adapter.replace(":", "-")


def render_report(report: Report) -> str:
    """A whole HTML document (``persona report --out FILE``): the body in a page that loads nothing.

    >>> html_text = render_report(build_report(store, matrix=False))   # doctest: +SKIP
    """
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>persona report: {_count(len(report.adapters), 'adapter')}</title>\n"
            f"</head>\n<body>\n{render_report_body(report)}\n</body>\n</html>\n")


def render_report_body(report: Report, *, heading: bool = True) -> str:
    """The report as one ``<div class="persona-report">`` with its own small ``<style>``, for embedding
    in another page (the server's ``/ui``); ``heading=False`` leaves out the title and store line."""
    from . import plots  # matplotlib: only when a report is rendered

    ids = (f"f{n}" for n in itertools.count(1))

    def figure(fig, title: str, caption: str = "") -> str:
        if fig is None:
            return ""
        svg = plots.figure_svg(fig, next(ids), title)
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f"<figure>{svg}{cap}</figure>"

    out = [f"<div class=\"persona-report\">\n<style>{STYLE}</style>"]
    if heading:
        matrix = "with the loss matrix" if report.matrix_requested else "without the loss matrix"
        adapters = _count(len(report.adapters), "adapter")
        out.append(f"<h1>persona report</h1>\n<p class=\"meta\">store {_e(report.store_root)} &middot; base "
                   f"{_e(report.base_id)} &middot; {_e(report.generated)} &middot; {adapters}, {matrix}</p>")
    if report.adapters:
        links = " ".join(f"<a href=\"#{_e(anchor(a.adapter))}\">{_e(a.adapter)}</a>" for a in report.adapters)
        out.append(f"<nav><a href=\"#across-adapters\">across adapters</a> {links}</nav>")
    else:
        out.append("<p class=\"note\">No adapters to report on.</p>")
    out.append(_summary(report, figure, plots))
    out.extend(_adapter_section(a, figure, plots) for a in report.adapters)
    out.append("</div>")
    return "\n".join(out)


def _summary(report: Report, figure: Callable, plots) -> str:
    parts = ["<section id=\"across-adapters\" class=\"summary\">\n<h2>Across adapters</h2>"]
    gain = plots.gain_figure(report)
    if gain is not None:
        parts.append("<h3>Gain over the base per adapter</h3>")
        parts.append(figure(gain, "gain over the base per adapter",
                            "With the loss matrix: the final version's loss below the base's, averaged over every "
                            "held-out slice the adapter kept. Without it: the mean held-out improvement of its "
                            "promoted updates over their parents, from meta.json."))
    forgetting = plots.forgetting_figure(report)
    if forgetting is not None:
        parts.append("<h3>Forgetting per adapter</h3>")
        parts.append(figure(forgetting, "forgetting per adapter",
                            "BWT (loss matrix): each kept slice's loss when its update was made minus the final "
                            "version's, averaged; negative means later versions forgot. The replay panel: the "
                            "largest rise of replay loss (old data) any update caused, as the gate measured it."))
    if gain is None and forgetting is None:
        parts.append("<p class=\"note\">No update has been measured yet.</p>")
    parts.append("<h3>Adapters the gate keeps refusing</h3>")
    failures = report.gate_failures
    if failures:
        rows = "".join(
            f"<tr><td><a href=\"#{_e(anchor(r.adapter))}\">{_e(r.adapter)}</a></td><td class=\"num\">{r.refused}"
            f" of {r.updates}</td><td class=\"num\">{r.refused_in_a_row}</td><td>{_e(r.last_reason)}</td></tr>"
            for r in failures)
        parts.append("<table class=\"gate-failures\"><thead><tr><th>adapter</th><th>refused updates</th>"
                     "<th>refused in a row (latest)</th><th>last reason</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    else:
        parts.append("<p class=\"note\">The gate refused no update.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _adapter_section(a: AdapterReport, figure: Callable, plots) -> str:
    aliases = ", ".join(f"{_e(k)} = v{v}" for k, v in sorted(a.aliases.items())) or "none"
    parts = [f"<section class=\"adapter\" id=\"{_e(anchor(a.adapter))}\" data-adapter=\"{_e(a.adapter)}\">",
             f"<h2>{_e(a.adapter)}</h2>",
             (f"<p class=\"meta\">{_count(len(a.timeline), 'version')}, {_count(len(a.updates), 'update')} "
              f"({len(a.refused)} refused) "
              f"&middot; aliases: {aliases}</p>")]
    if a.damaged:
        items = "".join(f"<li>{_e(p)}</li>" for p in a.damaged)
        parts.append(f"<div class=\"damaged\">Damaged (see <code>persona verify</code>):<ul>{items}</ul></div>")
    parts.append("<h3>Timeline</h3>")
    parts.append(figure(plots.timeline_figure(a), f"{a.adapter}: timeline",
                        "Each update: held-out loss of the new data (blue) and replay loss of old data (orange), "
                        "parent (hollow) to new version (filled); above, the gate's verdict "
                        "(\u2713 promoted to current, \u2717 kept as candidate); below, rows trained."))
    parts.append(_timeline_table(a.timeline))
    parts.append("<h3>Loss matrix</h3>")
    parts.append(_matrix_part(a, figure, plots))
    parts.append("<h3>Lineage</h3>")
    parts.append(figure(plots.lineage_figure(a), f"{a.adapter}: lineage",
                        "Versions left to right (green: current, dashed red: refused by the gate); above, the "
                        "versions of other adapters it was merged from, copied from or layered over."))
    parts.append(_lineage_list(a))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _gate_cell(p: TimelinePoint) -> str:
    if p.promoted is None:
        return "<td></td><td></td>"
    verdict = ("<span class=\"promoted\">promoted</span>" if p.promoted
               else "<span class=\"refused\">refused</span>") + (" (forced)" if p.forced else "")
    return f"<td>{verdict}</td><td class=\"reason\">{_e(p.reason or '')}</td>"


def _when(created: str) -> str:
    """``2026-11-28T14:57:41.682+00:00`` -> ``2026-11-28 14:57`` (the full stamp is the cell's title)."""
    return created[:16].replace("T", " ")


def _pair(before: float | None, after: float | None) -> str:
    return "" if before is None and after is None else f"{_num(before)} &rarr; {_num(after)}"


def _timeline_table(points: Sequence[TimelinePoint]) -> str:
    rows = []
    for p in points:
        rows.append(
            f"<tr><td>{_e(p.label)}</td><td>{_e(p.origin)}</td><td title=\"{_e(p.created)}\">{_e(_when(p.created))}</td>"
            f"<td>{_e(', '.join(p.aliases))}</td><td class=\"num\">{_e(p.rows_trained if p.rows_trained is not None else '')}</td>"
            f"<td class=\"num\">{_pair(p.heldout_before, p.heldout_after)}</td>"
            f"<td class=\"num\">{_pair(p.replay_before, p.replay_after)}</td>"
            f"<td class=\"num\">{_num(p.forgetting) if p.replay_before is not None else ''}</td>{_gate_cell(p)}"
            f"<td>{'kept' if p.heldout_kept else 'not kept'}</td></tr>")
    return ("<table class=\"timeline\"><thead><tr><th>version</th><th>made by</th><th>created</th><th>aliases</th>"
            "<th>rows trained</th><th>held-out loss</th><th>replay loss</th><th>forgetting</th><th>gate</th>"
            f"<th>reason</th><th>held-out slice</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _matrix_part(a: AdapterReport, figure: Callable, plots) -> str:
    m = a.matrix
    if m is None:
        return f"<p class=\"note\">{_e(a.matrix_note)}</p>"
    caption = (f"R as of {_e(m.final)}: loss per token of each row's version on the held-out slice each update "
               "kept (outlined: the version that update made). "
               f"BWT {_num(m.bwt)} (negative = forgetting), FWT {_num(m.fwt)} (positive = the version an "
               "update started from already beat the base on its data).")
    if m.not_kept:
        caption += f" Not kept: {_e(', '.join(m.not_kept))}."
    fig = plots.matrix_figure(m)
    if fig is None:
        return f"<p class=\"note\">No version up to {_e(m.final)} kept a held-out slice. {caption}</p>"
    gains = "".join(f"<td class=\"num\">{_num(g)}</td>" for g in m.gain)
    heads = "".join(f"<th>{_e(c)}</th>" for c in m.columns)
    table = (f"<table class=\"gain\"><tr><th>update</th>{heads}</tr><tr><th>gain over the base</th>{gains}</tr></table>")
    return figure(fig, f"{a.adapter}: loss matrix", caption) + table


def _lineage_list(a: AdapterReport) -> str:
    external = [e for e in a.lineage if not e.internal]
    if not external:
        return ""
    items: Iterable[str] = (f"<li>{_e(e.target)} &larr; {_e(e.source)}: {_e(e.relation)}"
                            f"{' (' + _e(e.detail) + ')' if e.detail else ''}</li>" for e in external)
    return f"<ul class=\"lineage\">{''.join(items)}</ul>"
