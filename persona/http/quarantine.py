"""Adapters the learning loop leaves out after their update failed, until something about them changes.

One adapter's bad pending data (a line that is not an interaction, rows that make its loss
non-finite) fails its update at every run. Retrying it at every run would spend a run on it each
time, and a policy like ``pending>=N`` would keep firing for rows that can never train. So the
scheduler (:mod:`persona.http.autoupdate`) quarantines an adapter whose update failed in a run that
otherwise completed: later runs pass ``--exclude`` for it, and its rows do not count toward the
policy's triggers. It is held together with what it was when it failed: the fingerprint of its
pending queue (``Store.pending_fingerprint``: rows and a sha256 of their lines, taken as the run
started) and its newest version number. It is released as soon as either changes: a chat logged to
it, a person fixing or forgetting its queue, a ``persona update`` of it that published a version (and
consumed the rows it trained on), or the adapter's deletion. Released, it is tried at the next run
again, and quarantined again if it fails again.

The quarantine lives in the server's memory: a restarted server tries every adapter once more.
Checking it costs, per quarantined adapter and check, one listing of its version folders and, when
its row count is unchanged, one read of its pending queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AdapterNotFound, PersonaError
from ..refs import format_version

if TYPE_CHECKING:
    from ..store.queues import PendingFingerprint


@dataclass(frozen=True)
class Quarantined:
    """An adapter left out of runs: why, and what it was when its update failed."""

    adapter: str  # KIND:NAME
    reason: str  # the failed update's error, one line
    pending: PendingFingerprint | None  # its pending queue as the failed run started (None: not seen then)
    newest: int | None  # its newest version number after the failure


@dataclass(frozen=True)
class Release:
    """An adapter let back into the runs, and what changed."""

    adapter: str
    why: str


class Quarantine:
    """The quarantined adapters of one learning loop (used by its scheduler thread only)."""

    def __init__(self) -> None:
        self._held: dict[str, Quarantined] = {}

    def hold(self, entry: Quarantined) -> None:
        self._held[entry.adapter] = entry

    def adapters(self) -> tuple[str, ...]:
        """The quarantined adapters, sorted (the worker's ``--exclude`` list)."""
        return tuple(sorted(self._held))

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._held

    def __len__(self) -> int:
        return len(self._held)

    def release_changed(self, store, pending_counts: Mapping[str, int]) -> list[Release]:
        """Release every adapter whose pending queue or newest version changed since it failed.

        ``pending_counts`` is this check's ``Store.pending_counts()``: an adapter whose row count
        differs is released without reading its queue again."""
        released = []
        for adapter, entry in list(self._held.items()):
            why = _what_changed(store, entry, pending_counts.get(adapter, 0))
            if why is not None:
                del self._held[adapter]
                released.append(Release(adapter, why))
        return released


def _what_changed(store, entry: Quarantined, rows: int) -> str | None:
    try:
        versions = store.version_numbers(entry.adapter)
        if (versions[-1] if versions else None) != entry.newest:
            return f"a new version ({format_version(versions[-1])}) was published"
        if not rows:
            return "its pending queue is empty"
        if entry.pending is None or rows != entry.pending.rows \
                or store.pending_fingerprint(entry.adapter) != entry.pending:
            return "its pending queue changed"
    except AdapterNotFound:
        return "it was deleted"
    except (PersonaError, OSError):
        return None  # unreadable right now: nothing is known to have changed; asked again at the next check
    return None
