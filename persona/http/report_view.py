"""The dashboard's report: ``persona report``'s HTML body for the adapters a caller may see,
built off the event loop and cached.

The report itself is :mod:`persona.report`'s (the same one ``persona report`` writes); this module
only chooses what to build and keeps what it built. A body is cached under the visible adapters and
the state of the whole store (every adapter's versions and aliases), so a new version, a moved
alias or a deleted adapter shows at the next page load, and an unchanged store is not re-read.

The live page is built without the loss matrix (``matrix=False``: no base, no torch work): the
server's engine already holds the base for serving, and the matrix would load a second copy and
run every version over every kept held-out slice. The page's "compute the loss matrix" button asks
for it (:meth:`ReportCache.build` with ``matrix=True``, one at a time per server); once built, it
is what the page shows until the store changes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Sequence

CACHED_REPORTS = 32


def store_state(adapters: Sequence) -> str:
    """A digest of what the report reads from the listing: each adapter's versions and aliases."""
    digest = hashlib.sha256()
    for a in sorted(adapters, key=lambda a: a.adapter):
        versions = ",".join(str(v.version) for v in a.versions)
        aliases = ",".join(f"{k}={v}" for k, v in sorted(a.aliases.items()))
        digest.update(f"{a.adapter}|{versions}|{aliases}|{len(a.damaged)}\n".encode())
    return digest.hexdigest()


def render_report_html(store, refs: Sequence[str], *, matrix: bool, placement=None) -> str:
    """``persona report``'s body for ``refs`` (what the dashboard embeds; blocking: run it in a thread)."""
    from ..report import build_report, render_report_body

    # heading=False: no title (the page has its own) and no store line (a user token has no business with
    # the server's paths)
    report = build_report(store, list(refs), matrix=matrix, placement=placement)
    return render_report_body(report, heading=False)


class ReportCache:
    """Rendered report bodies by (visible adapters, store state, with or without the matrix); bounded, thread-safe."""

    def __init__(self, size: int = CACHED_REPORTS):
        self.size = size
        self._bodies: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0  # how many bodies were rendered (the tests read it: a cached page renders nothing)

    @staticmethod
    def key(refs: Sequence[str], state: str, matrix: bool) -> tuple:
        return (tuple(refs), state, matrix)

    def cached(self, refs: Sequence[str], state: str) -> tuple[str, bool] | None:
        """The best body already built for this view and whether it has the matrix (preferred), or None."""
        with self._lock:
            for matrix in (True, False):
                key = self.key(refs, state, matrix)
                if key in self._bodies:
                    self._bodies.move_to_end(key)
                    return self._bodies[key], matrix
        return None

    def build(self, store, refs: Sequence[str], state: str, *, matrix: bool, placement=None) -> str:
        """The body for this view, rendered now unless cached (blocking: call it from a worker thread)."""
        key = self.key(refs, state, matrix)
        with self._lock:
            if key in self._bodies:
                return self._bodies[key]
        body = render_report_html(store, refs, matrix=matrix, placement=placement)
        with self._lock:
            self.builds += 1
            self._bodies[key] = body
            while len(self._bodies) > self.size:
                self._bodies.popitem(last=False)
        return body
