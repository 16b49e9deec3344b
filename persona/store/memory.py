"""A user adapter's retrieval memory (issue 16): every interaction logged for ``user:NAME`` becomes an
entry searchable at once, so a fact stated today can be put in the prompt before an update trains it.

**On disk**: ``ROOT/user/NAME/memory.jsonl``, one entry a line::

    {"id": "m-3f2a9c0b71d4", "source": "<sha256 of the interaction's canonical line>",
     "text": "User: My cat is called Tom.\\nAssistant: Noted.", "time": "2026-11-28T15:02:11.402+00:00"}

The file is the only source of truth: append-only under the adapter's write lock (one ``write(2)``
then ``fsync``), created 0600, never read or written through a symlink; :func:`forget` rewrites it
atomically. A crash mid-append can leave a torn last line with no newline: readers ignore it (it was
never acknowledged), and the next append cuts it off before writing. It lives in the adapter's
folder, so deleting the adapter deletes it, and it is never read for anyone else.

**The index is derived**: BM25 (``bm25s``) over the entries' words, built in this process and cached
by the file's size and sha256. When the file grew with the same prefix only the new lines are
tokenized (incremental); any other change rebuilds it. Nothing derived is written to disk, so no
stale or torn index can outlive a crash: the worst case is one rebuild (milliseconds for thousands
of short entries; ``benchmarks/memory.py`` measures it). Words are stemmed (PyStemmer, English).

**Fused search** (:func:`search` with a :class:`TextEmbedder`, given by whoever holds the base: the
store has no model) adds a ranking by embedding cosine and merges the two by reciprocal rank fusion.
Entry vectors are derived too: computed on the first fused search, kept on the adapter's index per
embedder key (base fingerprint + embedding id), reused by entry id and text across rebuilds, so a
forgotten entry has none and no vector crosses adapters; never written to disk.

Only user adapters have a memory: a domain adapter reaches every user's token, so retrieving its
logged rows into prompts would show one user's words to all; merged adapters are admin-only training
artefacts. :func:`forget` works on every adapter (pending and replay rows of a domain hold people's
words too).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import PRIVATE_MODE, atomic_write_bytes, open_private_append, read_regular_file
from ..errors import InvalidConfig, InvalidReference
from ..interactions import Interaction
from ..refs import AdapterRef
from . import queues
from .layout import now
from .queues import PENDING, ReplayBuffer, jsonl_bytes

if TYPE_CHECKING:
    from .protocol import StoreView

MEMORY = "memory.jsonl"
MAX_K = 64
_ID = re.compile(r"m-[0-9a-f]{12}")
# Words that carry no fact: English stopwords (bm25s ships the list; nothing is downloaded) and the
# role labels every entry's text starts its lines with.
_EXTRA_STOPWORDS = ("user", "assistant")
_CACHE_SIZE = 256  # adapters whose index a process keeps
# Reciprocal rank fusion's constant (Cormack, Clarke & Buettcher 2009, "Reciprocal Rank Fusion
# outperforms Condorcet and individual rank learning methods"): the value of the paper, not tuned here.
RRF_K = 60


@dataclass(frozen=True)
class MemoryEntry:
    """One remembered interaction: its id, when it was logged, its text, and ``source``, the sha256 of
    the interaction's canonical JSON line (how ``forget --id`` finds the same row in pending and replay)."""

    id: str
    time: str
    text: str
    source: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "time": self.time, "text": self.text, "source": self.source}


@dataclass(frozen=True)
class MemoryHit:
    """A search result: the entry and its score, higher is more relevant: BM25 (always > 0), or with
    fusion the reciprocal-rank-fusion score (at most ``2 / (RRF_K + 1)``)."""

    entry: MemoryEntry
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry.to_dict(), "score": round(self.score, 6)}


@dataclass(frozen=True)
class TextEmbedder:
    """How fused search embeds texts, given by whoever holds a model (the store has none).

    ``key`` names the model and the embedding (the serving engine uses the base fingerprint and
    ``persona.embed.EMBEDDING_ID``): vectors are cached per key, so those of another base or another
    embedding are never compared. ``embed`` maps texts to one float row each (any array-like).

    >>> TextEmbedder("sha256:.../decoder-last-hidden/mean-skip-first/v1", lambda texts: ...)  # doctest: +SKIP
    """

    key: str
    embed: Callable[[Sequence[str]], Any]


@dataclass(frozen=True)
class MemorySnapshot:
    """Which state of a memory something saw: entries and the sha256 of the file (of b"" when empty).
    A version records the one it was trained with (``meta.json`` ``memory``)."""

    entries: int
    digest: str

    def record(self) -> dict[str, Any]:
        return {"entries": self.entries, "digest": self.digest}


@dataclass(frozen=True)
class ForgetReport:
    """How many rows ``forget`` removed from each place."""

    memory: int
    pending: int
    replay: int

    def to_dict(self) -> dict[str, int]:
        return {"memory": self.memory, "pending": self.pending, "replay": self.replay}


# ----------------------------------------------------------------------------- entries
def entry_text(interaction: Interaction) -> str:
    """What an entry remembers: the interaction's turns as ``User: ...``/``Assistant: ...`` lines (a
    prompt is the user's turn, its completion the assistant's; system turns are left out), or its text."""
    if interaction.messages is not None:
        turns = [(role, content) for role, content in interaction.messages if role != "system"]
    elif interaction.prompt is not None:
        turns = [("user", interaction.prompt), ("assistant", interaction.completion or "")]
    else:
        return interaction.text or ""
    return "\n".join(f"{role.capitalize()}: {content.strip()}" for role, content in turns)


def row_source(interaction: Interaction) -> str:
    """sha256 of an interaction's canonical line, as the queues write it."""
    return hashlib.sha256(jsonl_bytes([interaction])).hexdigest()


def _contents(interaction: Interaction) -> str:
    parts = [c for _, c in interaction.messages] if interaction.messages is not None else [
        interaction.prompt or "", interaction.completion or "", interaction.text or ""]
    return "\n".join(parts)


def _parse_lines(raw: bytes) -> tuple[list[MemoryEntry], int]:
    """Entries of a memory file and how many complete lines were unreadable (a torn last line, with no
    newline, was never acknowledged: it is neither an entry nor a problem)."""
    complete = raw[: raw.rfind(b"\n") + 1]
    entries, bad = [], 0
    for line in complete.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            entry = MemoryEntry(id=obj["id"], time=obj["time"], text=obj["text"], source=obj["source"])
            if not (isinstance(entry.id, str) and _ID.fullmatch(entry.id) and isinstance(entry.text, str)
                    and isinstance(entry.time, str) and isinstance(entry.source, str)):
                raise ValueError("bad field")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            bad += 1
            continue
        entries.append(entry)
    return entries, bad


def _read_raw(folder: Path) -> bytes:
    try:
        return read_regular_file(folder / MEMORY)
    except FileNotFoundError:
        return b""


def read(folder: Path) -> list[MemoryEntry]:
    """Every readable entry, oldest first."""
    return _parse_lines(_read_raw(folder))[0]


def problems(folder: Path) -> list[str]:
    """What ``persona verify`` reports about a memory file: unreadable lines, a torn tail, permissions."""
    path = folder / MEMORY
    if not path.exists() and not path.is_symlink():
        return []
    raw = _read_raw(folder)  # IntegrityError for a symlink or a non-regular file: the caller reports it
    found = []
    bad = _parse_lines(raw)[1]
    if bad:
        found.append(f"{bad} unreadable line(s): `persona memory forget --id` cannot reach them; "
                     "they are skipped by search")
    if raw and not raw.endswith(b"\n"):
        found.append("a torn last line (an append interrupted by a crash); the next log removes it")
    if os.stat(path).st_mode & 0o077:
        found.append("readable by other users (should be mode 0600)")
    return found


def snapshot(folder: Path) -> MemorySnapshot:
    raw = _read_raw(folder)
    complete = raw[: raw.rfind(b"\n") + 1]
    return MemorySnapshot(len(_parse_lines(complete)[0]), hashlib.sha256(complete).hexdigest())


def append(folder: Path, interactions: Sequence[Interaction]) -> list[MemoryEntry]:
    """Remember interactions (hold the adapter's write lock): one write, then fsync. A torn tail a crash
    left is cut off first, so it never glues onto the first new line."""
    entries = [MemoryEntry(id=f"m-{secrets.token_hex(6)}", time=now(), text=entry_text(i), source=row_source(i))
               for i in interactions]
    if not entries:
        return []
    data = b"".join(_line(e) for e in entries)
    fd = open_private_append(folder / MEMORY)
    with os.fdopen(fd, "r+b", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # a torn tail: cut it (rare, so reading the file once is fine)
                f.seek(0)
                os.ftruncate(f.fileno(), f.read().rfind(b"\n") + 1)
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())
    return entries


def _line(entry: MemoryEntry) -> bytes:
    return (json.dumps(entry.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


# ----------------------------------------------------------------------------- search
class _Index:
    """The BM25 index of one memory file at one (size, sha256)."""

    def __init__(self, size: int, digest: str, entries: list[MemoryEntry], tokens: list[list[str]],
                 previous: _Index | None = None):
        import bm25s

        self.size, self.digest, self.entries, self.tokens = size, digest, entries, tokens
        self.model = None
        if any(tokens):
            self.model = bm25s.BM25()
            self.model.index(tokens, show_progress=False)
        # Embeddings of the entries, one unit row each, per embedder key; computed on the first fused
        # search. Rows of the same folder's previous index are reused for entries still present with
        # the same id and text, so a log embeds only the new entry and a forget embeds nothing; a
        # forgotten entry has no row here, since rows follow ``entries``, read from the file.
        self._vectors: dict[str, Any] = {}
        self._reusable = previous._rows_by_entry() if previous is not None else {}
        self._vectors_lock = threading.Lock()

    def _rows_by_entry(self) -> dict[str, dict[tuple[str, str], Any]]:
        """Vectors of this index's entries by (id, text), per key: the computed ones, and the reusable
        ones not asked for yet (only of entries still here, so a forgotten entry's vector goes)."""
        with self._vectors_lock:
            here = {(e.id, e.text) for e in self.entries}
            rows = {key: {k: row for k, row in known.items() if k in here} for key, known in self._reusable.items()}
            for key, matrix in self._vectors.items():
                rows[key] = {(e.id, e.text): row for e, row in zip(self.entries, matrix)}
            return rows

    def vectors(self, embedder: TextEmbedder):
        """``[entries, dim]`` unit rows of ``embedder`` (embedding only entries not seen before)."""
        import numpy as np

        with self._vectors_lock:
            have = self._vectors.get(embedder.key)
            if have is not None:
                return have
            known = self._reusable.get(embedder.key, {})
            missing = [i for i, e in enumerate(self.entries) if (e.id, e.text) not in known]
            fresh = _unit(embedder.embed([self.entries[i].text for i in missing])) if missing else None
            rows, new = [], iter(range(len(missing)))
            for e in self.entries:
                old = known.get((e.id, e.text))
                rows.append(old if old is not None else fresh[next(new)])
            matrix = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
            self._vectors[embedder.key] = matrix
            self._reusable.pop(embedder.key, None)
            return matrix


def _unit(rows):
    import numpy as np

    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise InvalidConfig(f"an embedder must return one row per text, got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


_indexes: OrderedDict[str, _Index] = OrderedDict()
_indexes_lock = threading.Lock()


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Words of each text as the index and queries see them: lower case, English stopwords and role
    labels removed, each word reduced to its stem (PyStemmer's English Snowball stemmer: "living" and
    "lives" are "live") unless :data:`STEMMING` is off."""
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN

    stemmer = _stemmer() if STEMMING else None
    out = bm25s.tokenize(list(texts), stopwords=list(STOPWORDS_EN) + list(_EXTRA_STOPWORDS), stemmer=stemmer,
                         return_ids=False, show_progress=False)
    return [list(words) for words in out]


STEMMING = True  # benchmarks/memory.py turns it off (and clears the cached indexes) to show what stemming adds


_per_thread = threading.local()


def _stemmer():
    # one stemmer per thread: a PyStemmer Stemmer keeps a cache and must not be shared between threads
    stem = getattr(_per_thread, "stem", None)
    if stem is None:
        import Stemmer  # PyStemmer

        stem = _per_thread.stem = Stemmer.Stemmer("english").stemWords
    return stem


def index_for(folder: Path) -> _Index:
    """The index of the memory file as it is now: cached, extended when the file only grew, rebuilt otherwise."""
    raw = _read_raw(folder)
    raw = raw[: raw.rfind(b"\n") + 1]
    digest = hashlib.sha256(raw).hexdigest()
    key = str(folder)
    with _indexes_lock:
        cached = _indexes.get(key)
        if cached is not None:
            _indexes.move_to_end(key)
    if cached is not None and cached.digest == digest:
        return cached
    entries = _parse_lines(raw)[0]
    if (cached is not None and cached.size < len(raw)
            and hashlib.sha256(raw[: cached.size]).hexdigest() == cached.digest):
        tokens = cached.tokens + tokenize([e.text for e in entries[len(cached.entries):]])
    else:
        tokens = tokenize([e.text for e in entries])
    index = _Index(len(raw), digest, entries, tokens, previous=cached)
    with _indexes_lock:
        _indexes[key] = index
        while len(_indexes) > _CACHE_SIZE:
            _indexes.popitem(last=False)
    return index


def search(folder: Path, query: str, k: int, embedder: TextEmbedder | None = None) -> list[MemoryHit]:
    """The ``k`` entries that best match ``query``, best first.

    Without ``embedder``: BM25, and entries sharing no word with the query are left out. With it:
    reciprocal rank fusion of the BM25 ranking (entries sharing a word) and the ranking of every
    entry by cosine between its embedding and the query's, each entry scoring the sum of
    ``1 / (RRF_K + rank)`` over the rankings it is in; an entry sharing no word with the query can
    then be found by meaning ("Which city am I living in?" for "I live in Lisbon").
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidConfig(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    index = index_for(folder)
    if not index.entries:
        return []
    import numpy as np

    words = tokenize([query])[0]
    lexical = np.asarray(index.model.get_scores(words)) if index.model is not None and words else None
    ranked = [] if lexical is None else [int(i) for i in np.argsort(-lexical, kind="stable") if lexical[i] > 0]
    if embedder is None:
        return [MemoryHit(index.entries[i], float(lexical[i])) for i in ranked[:k]]
    cosine = index.vectors(embedder) @ _unit(embedder.embed([query]))[0]
    fused = np.zeros(len(index.entries))
    for ranking in (ranked, np.argsort(-cosine, kind="stable")):
        for rank, i in enumerate(ranking, start=1):
            fused[i] += 1.0 / (RRF_K + rank)
    order = np.argsort(-fused, kind="stable")[:k]
    return [MemoryHit(index.entries[i], float(fused[i])) for i in order]


# ----------------------------------------------------------------------------- forgetting
def forget(store: StoreView, ref: AdapterRef, *, match: str | None = None, entry_id: str | None = None) -> ForgetReport:
    """Remove what ``match`` (case-insensitive text) or ``entry_id`` (a memory id, and the pending and
    replay rows of the same interaction) names from the memory, the pending queue and the replay
    buffer: each rewritten atomically under the adapter's write lock."""
    if (match is None) == (entry_id is None):
        raise InvalidConfig("forget takes exactly one of match (--match TEXT) and entry_id (--id ID)")
    if match is not None and not match.strip():
        raise InvalidConfig("--match needs a non-empty text")
    if entry_id is not None and not _ID.fullmatch(entry_id):
        raise InvalidReference(f"{entry_id!r} is not a memory id (m- and 12 hex digits; see `persona memory show`)")
    ref = ref.unpinned()
    # An update in progress read the replay buffer and took the pending batch when it began, and at
    # its end writes that buffer back with the batch offered into it and removes the batch by its
    # digest: a forget in between would be undone (the rows replayed again) and the batch's other rows
    # trained twice. So forget waits for it, as a second update would.
    with store.lock(ref, purpose="update"):
        return _forget_now(store, ref, match, entry_id)


def _forget_now(store: StoreView, ref: AdapterRef, match: str | None, entry_id: str | None) -> ForgetReport:
    queues.drop_consumed(store, ref)  # rows a published version consumed leave first, so digests stay true
    folder = store._adapter_dir(ref)
    with store.lock(ref):
        entries = read(folder)
        pending = queues.read(folder).interactions
        buffer = ReplayBuffer.read(folder)
        if entry_id is not None:
            doomed = [e for e in entries if e.id == entry_id]
            sources = {e.source for e in doomed}
            hits_row = lambda i: row_source(i) in sources
        else:
            # a row and its entry are matched on the same texts, so neither outlives the other: the
            # entry's "User: ..." lines (a match on "User:" or across turns) and the row's raw contents
            # (a system turn, which the entry leaves out)
            needle = match.casefold()
            hits_row = lambda i: needle in _contents(i).casefold() or needle in entry_text(i).casefold()
            sources = {row_source(i) for i in (*pending, *buffer.items) if hits_row(i)}
            doomed = [e for e in entries if needle in e.text.casefold() or e.source in sources]
        if doomed:
            gone = {e.id for e in doomed}
            atomic_write_bytes(folder / MEMORY, b"".join(_line(e) for e in entries if e.id not in gone), PRIVATE_MODE)
        keep = [i for i in pending if not hits_row(i)]
        if len(keep) < len(pending):
            atomic_write_bytes(folder / PENDING, jsonl_bytes(keep), PRIVATE_MODE)
        kept = tuple(i for i in buffer.items if not hits_row(i))
        if len(kept) < len(buffer.items):
            ReplayBuffer(kept, buffer.seen).write(folder)
    return ForgetReport(len(doomed), len(pending) - len(keep), len(buffer.items) - len(kept))


# ----------------------------------------------------------------------------- the facade's view
class AdapterMemory:
    """One adapter's memory, as ``Store.memory(ref)`` hands it out.

    >>> memory = store.memory("user:alice")                  # doctest: +SKIP
    >>> [hit.entry.text for hit in memory.search("cat name", k=2)]   # doctest: +SKIP
    ['User: My cat is called Tom.\\nAssistant: Noted.']
    """

    def __init__(self, store: StoreView, ref: AdapterRef):
        self.store, self.ref = store, ref.unpinned()
        self.folder = store._adapter_dir(self.ref)

    @property
    def kept(self) -> bool:
        """Whether this adapter keeps a memory (user adapters only; see the module's docstring)."""
        return self.ref.kind == "user"

    def _require_kept(self) -> None:
        if not self.kept:
            raise InvalidReference(f"{self.ref.id} has no memory: only user adapters keep one (a {self.ref.kind} "
                                   "adapter is shared, and its logged rows must not reach anyone's prompt)")

    def entries(self) -> list[MemoryEntry]:
        """Every entry, oldest first."""
        self._require_kept()
        return read(self.folder)

    def search(self, query: str, k: int = 4, embedder: TextEmbedder | None = None) -> list[MemoryHit]:
        """The ``k`` best entries for ``query``, best first: BM25 (only entries sharing a word with it),
        or fused with ``embedder``'s embeddings when given (see :func:`search`)."""
        self._require_kept()
        return search(self.folder, query, k, embedder)

    def snapshot(self) -> MemorySnapshot:
        """How many entries and the file's sha256 (what a version records it was trained with)."""
        return snapshot(self.folder)

    def forget(self, *, match: str | None = None, entry_id: str | None = None) -> ForgetReport:
        """Remove matching rows from the memory, the pending queue and the replay buffer (see :func:`forget`).
        The adapter's weights keep what they learned until the next update retrains them."""
        return forget(self.store, self.ref, match=match, entry_id=entry_id)
