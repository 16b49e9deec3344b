"""What a report shows, gathered from the store: typed, frozen, and free of plotting and HTML.

Each version's timeline row comes from its ``meta.json`` alone (the metrics an update recorded:
``UpdateMetrics.to_dict()``), and so does the lineage, so a report with ``matrix=False`` reads only
meta files and never imports torch. The loss matrix (``training/matrix.py``) needs the base loaded:
it is computed only for adapters where some version kept a held-out slice, by a :data:`MatrixSource`
the caller may inject (the server passes one over the trainer it already holds).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PersonaError
from ..refs import AdapterRef, format_version, parse_ref
from ..store import AdapterInfo, Store, VersionInfo

if TYPE_CHECKING:
    from ..base import Placement
    from ..training.matrix import LossMatrix

__all__ = ["AdapterReport", "GateRecord", "LineageEdge", "MatrixSource", "Report", "TimelinePoint", "build_report"]

MatrixSource = Callable[[AdapterRef], "LossMatrix"]
"""Computes the loss matrix of a reference (as ``Trainer.loss_matrix`` does)."""


@dataclass(frozen=True)
class TimelinePoint:
    """One version on an adapter's timeline, as its ``meta.json`` records it.

    ``origin`` says how the version was made: ``create`` (a fresh LoRA), ``update`` (trained: the
    metrics below are set), ``merge``, ``copy`` (``create --from``) or ``import``. Losses are mean
    next-token losses per target token; None where the update measured nothing (or none ran).
    """

    version: int
    label: str
    parent: int | None
    created: str
    origin: str
    aliases: tuple[str, ...]
    heldout_before: float | None = None
    heldout_after: float | None = None
    replay_before: float | None = None
    replay_after: float | None = None
    forgetting: float | None = None
    promoted: bool | None = None
    forced: bool = False
    reason: str | None = None
    rows_trained: int | None = None
    heldout_rows: int | None = None
    replay_rows: int | None = None
    heldout_kept: bool = False

    @property
    def improvement(self) -> float | None:
        """Held-out loss before minus after (positive: the update learned its new data)."""
        if self.heldout_before is None or self.heldout_after is None:
            return None
        return self.heldout_before - self.heldout_after


@dataclass(frozen=True)
class LineageEdge:
    """``source`` (``kind:name@vN``, or this adapter's own ``vN``) -> this adapter's ``target`` version.

    ``relation``: ``parent`` (within the adapter), ``merge``, ``from`` (copied), ``over`` (the layer
    it runs on); ``detail`` what the lineage entry adds (a merge's method and weight)."""

    source: str
    target: str
    relation: str
    detail: str = ""

    @property
    def internal(self) -> bool:
        return ":" not in self.source


@dataclass(frozen=True)
class AdapterReport:
    """Everything shown for one adapter. ``matrix`` is None when it was not computed; ``matrix_note``
    says why (not asked for, no kept slice, or the error that stopped it)."""

    adapter: str
    kind: str
    final: str | None  # the version the reference names (current by default): the matrix is as of it
    aliases: Mapping[str, int]
    timeline: tuple[TimelinePoint, ...]
    lineage: tuple[LineageEdge, ...]
    matrix: LossMatrix | None
    matrix_note: str
    damaged: tuple[str, ...] = ()

    @property
    def updates(self) -> tuple[TimelinePoint, ...]:
        return tuple(p for p in self.timeline if p.origin == "update")

    @property
    def refused(self) -> tuple[TimelinePoint, ...]:
        return tuple(p for p in self.updates if p.promoted is False)

    @property
    def refused_in_a_row(self) -> int:
        """How many of the latest updates the gate refused, counting back from the newest."""
        count = 0
        for point in reversed(self.updates):
            if point.promoted is not False:
                break
            count += 1
        return count


@dataclass(frozen=True)
class GateRecord:
    """An adapter whose updates the gate refused: the cross-adapter table of the report."""

    adapter: str
    updates: int
    refused: int
    refused_in_a_row: int
    last_reason: str


@dataclass(frozen=True)
class Report:
    """A report over some adapters of one store; :func:`persona.report.render_report` turns it into HTML."""

    store_root: str
    base_id: str
    generated: str
    adapters: tuple[AdapterReport, ...]
    matrix_requested: bool

    @property
    def gate_failures(self) -> tuple[GateRecord, ...]:
        """Adapters with at least one refused update, those refusing most recently and most often first."""
        rows = [GateRecord(a.adapter, len(a.updates), len(a.refused), a.refused_in_a_row, a.refused[-1].reason or "")
                for a in self.adapters if a.refused]
        return tuple(sorted(rows, key=lambda r: (-r.refused_in_a_row, -r.refused, r.adapter)))


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _origin(info: VersionInfo) -> str:
    relations = {str(e.get("relation") or "lineage") for e in info.lineage}
    if info.imported:
        return "import"
    if "merge" in relations:
        return "merge"
    if "from" in relations:
        return "copy"
    if isinstance(info.metrics.get("gate"), Mapping) or "heldout_loss_after" in info.metrics:
        return "update"
    return "create"


def timeline_point(info: VersionInfo) -> TimelinePoint:
    """The timeline row of one version, from its recorded metrics (unknown or malformed values: None)."""
    m = info.metrics
    gate = m.get("gate") if isinstance(m.get("gate"), Mapping) else {}
    promoted = gate.get("promoted")
    reason = gate.get("reason")
    return TimelinePoint(
        version=info.version, label=info.label, parent=info.parent, created=info.created, origin=_origin(info),
        aliases=tuple(info.aliases),
        heldout_before=_num(m.get("heldout_loss_before")), heldout_after=_num(m.get("heldout_loss_after")),
        replay_before=_num(m.get("replay_loss_before")), replay_after=_num(m.get("replay_loss_after")),
        forgetting=_num(m.get("forgetting")),
        promoted=promoted if isinstance(promoted, bool) else None, forced=gate.get("forced") is True,
        reason=str(reason) if reason is not None else None,
        rows_trained=_int(m.get("train_examples")), heldout_rows=_int(m.get("heldout_examples")),
        replay_rows=_int(m.get("replay_examples")), heldout_kept=info.heldout_kept,
    )


def lineage_edges(versions: Sequence[VersionInfo]) -> tuple[LineageEdge, ...]:
    """Parent links within the adapter, then each version's sources (merge parents, copy source, layer)."""
    edges = []
    for info in versions:
        if info.parent is not None:
            edges.append(LineageEdge(format_version(info.parent), info.label, "parent"))
        for entry in info.lineage:
            detail = []
            if entry.get("method") is not None:
                detail.append(str(entry["method"]))
            if _num(entry.get("weight")) is not None:
                detail.append(f"weight {_num(entry['weight']):g}")
            edges.append(LineageEdge(f"{entry['adapter']}@{format_version(entry['version'])}", info.label,
                                     str(entry.get("relation") or "lineage"), ", ".join(detail)))
        # A layered adapter records its layer on every version; draw it where it starts or changes.
        if info.over and (info.parent is None or _over_of(versions, info.parent) != info.over):
            edges.append(LineageEdge(f"{info.over['adapter']}@{format_version(info.over['version'])}", info.label,
                                     "over"))
    return tuple(edges)


def _over_of(versions: Sequence[VersionInfo], number: int) -> Mapping[str, Any] | None:
    return next((v.over for v in versions if v.version == number), None)


def _selects(ref: AdapterRef) -> bool:
    """Whether ``ref`` names a version or alias of its own (not the default ``current``)."""
    return ref.version is not None or ref.alias is not None


def _selected(store: Store, refs: Iterable[str | AdapterRef] | None) -> list[tuple[AdapterRef, AdapterInfo]]:
    """Each reference with its adapter's record; every unknown one fails here, before any work."""
    if refs is None:
        return [(parse_ref(a.adapter), a) for a in store.list()]
    out, seen = [], set()
    for raw in refs:
        ref = parse_ref(raw)
        if ref.id in seen:
            continue
        seen.add(ref.id)
        info = store.show(ref)
        if _selects(ref):
            store.resolve(ref)  # an unknown version or alias fails now, not halfway through
        out.append((ref, info))
    return out


def _adapter_report(store: Store, ref: AdapterRef, info: AdapterInfo, matrix_for: MatrixSource | None,
                    matrix_note: str) -> AdapterReport:
    final = None
    try:
        final = store.resolve(ref).version
    except PersonaError:  # no current (a damaged refs.json): the timeline still shows every readable version
        pass
    # An unpinned reference shows every version (a refused candidate after current too); a pinned one
    # shows the adapter as it was then.
    versions = [v for v in info.versions if not _selects(ref) or final is None or v.version <= final]
    matrix = None
    if matrix_for is not None and final is None:
        matrix_note = f"no version to score: {ref} names none (see `persona show {ref.id}`)"
    elif matrix_for is not None:
        if not any(v.heldout_kept for v in versions if v.version <= final):
            matrix_note = "no version up to this one kept a held-out slice (updates keep one from this persona on)"
        else:
            try:
                matrix, matrix_note = matrix_for(ref), ""
            except PersonaError as exc:  # one damaged adapter does not stop the report of the others
                matrix_note = f"the loss matrix could not be computed: {exc}"
    return AdapterReport(
        adapter=info.adapter, kind=info.kind, final=format_version(final) if final is not None else None,
        aliases=dict(info.aliases), timeline=tuple(timeline_point(v) for v in versions),
        lineage=lineage_edges(versions), matrix=matrix, matrix_note=matrix_note,
        damaged=tuple(str(p) for p in info.damaged),
    )


def trainer_matrix_source(store: Store, placement: Placement | None = None, max_length: int = 512) -> MatrixSource:
    """A :data:`MatrixSource` that loads the base on first use (once) and scores with ``Trainer.loss_matrix``."""
    trainer = None

    def compute(ref: AdapterRef) -> LossMatrix:
        nonlocal trainer
        if trainer is None:
            from ..training.trainer import Trainer

            trainer = Trainer(store, device=placement.device if placement else None,
                              dtype=placement.dtype if placement else None)
        return trainer.loss_matrix(ref, max_length=max_length)

    return compute


def build_report(store: Store, refs: Iterable[str | AdapterRef] | None = None, *,
                 matrix: bool | MatrixSource = True, placement: Placement | None = None, max_length: int = 512,
                 progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> Report:
    """Gather a :class:`Report` on ``refs`` (None: every adapter of the store).

    ``matrix``: True computes each adapter's loss matrix with a trainer loading the base once (placed
    by ``placement``), only for adapters with a kept held-out slice; False skips it (no torch); a
    callable ``ref -> LossMatrix`` is used as it is. ``progress`` wraps the loop over adapters
    (``tqdm``). An unknown reference raises before anything is computed.

    >>> report = build_report(Store.open(), ["user:alice"], matrix=False)   # doctest: +SKIP
    >>> [p.label for p in report.adapters[0].timeline]                      # doctest: +SKIP
    ['v0001', 'v0002', 'v0003']
    """
    selected = _selected(store, refs)
    if matrix is True:
        matrix_for: MatrixSource | None = trainer_matrix_source(store, placement, max_length)
    else:
        matrix_for = matrix or None
    note = "" if matrix_for is not None else "not computed (the report was built without the loss matrix)"
    loop: Iterable[tuple[AdapterRef, AdapterInfo]] = progress(selected) if progress else selected
    adapters = tuple(_adapter_report(store, ref, info, matrix_for, note) for ref, info in loop)
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return Report(str(store.root), store.config.base_id, generated, adapters, matrix_for is not None)
