"""Reports of what each update did (issue 14): per adapter, the version timeline, the loss matrix as a
heat map and the lineage graph; across adapters, gain over the base, forgetting and the gate's refusals.

Three steps, each reusable on its own: :func:`build_report` gathers a typed :class:`Report` from the
store (``matrix=False``: from ``meta.json`` alone, without torch), :func:`render_report` turns it into
one self-contained HTML document (``persona report``), and :func:`render_report_body` into the
fragment the server's dashboard embeds. matplotlib is imported only when a report is rendered.

>>> from persona.report import build_report, render_report                  # doctest: +SKIP
>>> html_text = render_report(build_report(Store.open(), ["user:alice"]))   # doctest: +SKIP
"""

from .collect import AdapterReport, GateRecord, LineageEdge, MatrixSource, Report, TimelinePoint, build_report
from .html import render_report, render_report_body

__all__ = ["AdapterReport", "GateRecord", "LineageEdge", "MatrixSource", "Report", "TimelinePoint", "build_report",
           "render_report", "render_report_body"]
