"""An adapter's two interaction queues, beside its versions: the replay buffer and the pending queue.

**Replay buffer** (``replay.jsonl`` + ``replay.state.json``): a reservoir sample (Vitter's algorithm
R) of every interaction the adapter has been trained on: bounded in size, each past interaction
equally likely to be kept, oldest first. Only ever read for that adapter. Both files are rewritten
atomically.

**Pending queue** (``pending.jsonl`` + ``pending.state.json``): one interaction a line, appended by
``persona log`` (and the server), consumed exactly once. An update from the queue trains on its
first N rows, publishes its version with ``meta["pending"] = {"rows": N, "digest": sha256 of those
lines}``, and only then removes the rows. A SIGKILL between the publish and the removal leaves rows a
published version already learned (issue 10, item 11). Before the next update reads the queue,
:func:`drop_consumed` compares the queue's head with the newest version that consumed pending rows:
when ``pending.state.json`` does not yet record that version as consumed and the head's digest
matches, those rows are removed, not trained again. Removal itself checks the digest first, so it
never removes rows twice. The one case this cannot tell apart: a crash in the instant between
removing the rows and recording it, followed by the very same lines logged again; those would be
skipped once.

All four files hold a person's interactions: created with mode 0600 (never widened afterwards) and
never read or written through a symlink. The functions taking a folder are the file format; the
:class:`~persona.store.Store` methods (``replay``, ``write_replay``, ``take_pending``, ...) are how
code outside the store reaches them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .._fs import PRIVATE_MODE, TMP_PREFIX, atomic_write_bytes, atomic_write_json, read_regular_file
from ..errors import IntegrityError, InvalidInteractions, InvalidName
from ..interactions import Interaction, append_jsonl, parse_interactions
from ..refs import KINDS, AdapterRef

if TYPE_CHECKING:
    from .protocol import StoreView

REPLAY = "replay.jsonl"
REPLAY_STATE = "replay.state.json"
PENDING = "pending.jsonl"
PENDING_STATE = "pending.state.json"


# ----------------------------------------------------------------------------- replay buffer
def _to_line(i: Interaction) -> str:
    return json.dumps(i.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def jsonl_bytes(interactions: Sequence[Interaction]) -> bytes:
    """Interactions as the store writes them (replay buffer, a version's held-out slice): canonical JSON Lines."""
    return "".join(_to_line(i) + "\n" for i in interactions).encode("utf-8")


@dataclass(frozen=True)
class ReplayBuffer:
    """The reservoir of one adapter: ``items`` kept, out of ``seen`` ever offered."""

    items: tuple[Interaction, ...]
    seen: int

    @classmethod
    def read(cls, folder: Path) -> "ReplayBuffer":
        path = folder / REPLAY
        try:  # never through a symlink: a planted link would feed another file into rehearsal
            raw = read_regular_file(path).decode("utf-8")
        except FileNotFoundError:
            return cls((), 0)
        # Split on "\n" only: lines are JSON written with ensure_ascii=False, whose strings may hold
        # U+2028 and other characters that str.splitlines would split a row on.
        # an empty file is an emptied buffer (forget may remove every row), not a bad one
        items = tuple(parse_interactions(raw.split("\n"), source=str(path))) if raw.strip() else ()
        try:
            seen = int(json.loads(read_regular_file(folder / REPLAY_STATE))["seen"])
        except (OSError, ValueError, KeyError, TypeError):
            seen = len(items)
        return cls(items, max(seen, len(items)))

    def offer(self, new: Sequence[Interaction], capacity: int, seed: int) -> "ReplayBuffer":
        """Algorithm R: each of the ``seen + len(new)`` interactions ends up kept with equal probability."""
        rng = random.Random(seed * 1_000_003 + self.seen)
        items = list(self.items)
        seen = self.seen
        for interaction in new:
            seen += 1
            if len(items) < capacity:
                items.append(interaction)
            else:
                j = rng.randrange(seen)
                if j < capacity:
                    # The newcomer goes last, not into slot j: the buffer stays oldest-first, which
                    # recency-weighted replay (UpdateConfig.replay_recency) reads as age.
                    del items[j]
                    items.append(interaction)
        return ReplayBuffer(tuple(items[:capacity]), seen)

    def write(self, folder: Path) -> None:
        atomic_write_bytes(folder / REPLAY, jsonl_bytes(self.items), PRIVATE_MODE)
        atomic_write_json(folder / REPLAY_STATE, {"seen": self.seen, "size": len(self.items)}, PRIVATE_MODE)


# ----------------------------------------------------------------------------- pending queue
@dataclass(frozen=True)
class PendingBatch:
    """The head of a queue an update trains on: its interactions and the digest of their lines."""

    interactions: tuple[Interaction, ...]
    digest: str

    @property
    def rows(self) -> int:
        return len(self.interactions)

    def record(self) -> dict[str, Any]:
        """What the published version's ``meta.json`` records under ``pending``."""
        return {"rows": self.rows, "digest": self.digest}


@dataclass(frozen=True)
class PendingFingerprint:
    """What a pending queue holds, cheap to compare: its rows and the sha256 of its lines (the digest a
    :class:`PendingBatch` of the whole queue records). Any append, consumption or rewrite changes it."""

    rows: int
    digest: str


def _lines(folder: Path) -> list[bytes]:
    """The queue's non-blank lines, without their newline (split on ``\\n`` only: the lines are
    JSON, whose strings may hold U+2028 and other characters ``str.splitlines`` would split on)."""
    try:
        raw = read_regular_file(folder / PENDING)
    except FileNotFoundError:
        return []
    return [line for line in raw.split(b"\n") if line.decode("utf-8", "replace").strip()]


def _digest(lines: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.rstrip(b"\r") + b"\n")
    return h.hexdigest()


def _remove_head(folder: Path, lines: list[bytes], rows: int) -> None:
    atomic_write_bytes(folder / PENDING, b"".join(line + b"\n" for line in lines[rows:]), PRIVATE_MODE)


def _consumed_through(folder: Path) -> int:
    try:
        value = json.loads(read_regular_file(folder / PENDING_STATE)).get("consumed", 0)
    except (FileNotFoundError, IntegrityError, ValueError, AttributeError):
        return 0  # then the digest alone decides
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mark_consumed(folder: Path, version: int) -> None:
    atomic_write_json(folder / PENDING_STATE, {"consumed": max(version, _consumed_through(folder))}, PRIVATE_MODE)


def append(folder: Path, interactions: Sequence[Interaction]) -> int:
    """Append validated interactions to the queue (created 0600; a symlink is refused). Hold the write lock."""
    return append_jsonl(folder / PENDING, interactions, private=True)


def read(folder: Path) -> PendingBatch:
    """The whole queue as one batch (lines parsed and digested from the same bytes)."""
    lines = _lines(folder)
    if not lines:
        return PendingBatch((), _digest(()))
    try:
        text = [line.decode("utf-8") for line in lines]
    except UnicodeDecodeError:
        raise InvalidInteractions(f"{folder / PENDING} is not UTF-8 text; fix or remove the bad line") from None
    interactions = parse_interactions(text, source=str(folder / PENDING))
    return PendingBatch(tuple(interactions), _digest(lines))


def fingerprint(folder: Path) -> PendingFingerprint:
    """The queue's :class:`PendingFingerprint` (one read, no parsing: a damaged queue has one too)."""
    lines = _lines(folder)
    return PendingFingerprint(len(lines), _digest(lines))


def drop_consumed(store: StoreView, ref: AdapterRef) -> int:
    """Remove rows the newest pending-trained version consumed but a crash left queued; return how many."""
    ref = ref.unpinned()
    folder = store._adapter_dir(ref)
    with store.lock(ref):
        done = _consumed_through(folder)
        trained = [v for v in store.show(ref).versions if v.pending and v.version > done]
        if not trained:
            return 0
        newest = trained[-1]
        rows, lines = int(newest.pending["rows"]), _lines(folder)
        dropped = rows if len(lines) >= rows and _digest(lines[:rows]) == newest.pending["digest"] else 0
        if dropped:
            _remove_head(folder, lines, rows)
        _mark_consumed(folder, newest.version)
        return dropped


def take(store: StoreView, ref: AdapterRef) -> PendingBatch:
    """The queue to train on, after dropping what a published version already consumed."""
    drop_consumed(store, ref)
    with store.lock(ref):
        return read(store._adapter_dir(ref))


def consume(store: StoreView, ref: AdapterRef, batch: PendingBatch, version: int) -> bool:
    """Remove ``batch`` from the head of the queue now that ``version`` (trained on it) is published.

    Removes only while the head still is that batch, so a concurrent :func:`drop_consumed` and this
    never both remove it. Returns whether the rows were removed here.
    """
    ref = ref.unpinned()
    folder = store._adapter_dir(ref)
    with store.lock(ref):
        lines = _lines(folder)
        removed = len(lines) >= batch.rows and _digest(lines[: batch.rows]) == batch.digest
        if removed:
            _remove_head(folder, lines, batch.rows)
        _mark_consumed(folder, version)
        return removed


def pending_counts(store: StoreView) -> dict[str, int]:
    """``{adapter id: rows}`` of every adapter whose pending queue holds rows (the server's
    ``--auto-update`` polls it). Counts non-blank lines without parsing them, so a damaged queue
    still counts (its update then fails and says why); rows a crash left after a published version
    consumed them are counted until the next update drops them. No lock: an append in progress is
    counted by the next call. Cost: one read of each pending file; no ``meta.json`` is read."""
    counts: dict[str, int] = {}
    for kind in KINDS:
        folder = store.root / kind
        if not folder.is_dir() or folder.is_symlink():
            continue
        for child in folder.iterdir():
            if child.name.startswith(TMP_PREFIX) or child.is_symlink():
                continue
            try:
                ref = AdapterRef(kind, child.name)
                rows = len(_lines(child))
            except (InvalidName, IntegrityError, OSError):
                continue  # a stray folder, a symlinked queue (refused everywhere), or deleted while we looked
            if rows:
                counts[ref.id] = rows
    return counts
