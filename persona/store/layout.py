"""Where a store keeps what, and who may write it when: file names, validated paths, the base binding
(``persona.json``), the retired-version record and the file locks (raising :class:`LockTimeout`).

Layout (see docs/STORE.md)::

    ROOT/persona.json                 format, base id, base fingerprint
    ROOT/.locks/<hash>.lock           one writer lock per adapter (named by hash: no user names)
    ROOT/.retired.json                last version number of each deleted adapter, keyed by a hash of its id
    ROOT/tokens.json                  API tokens (see :mod:`persona.store.tokens`)
    ROOT/KIND/NAME/vNNNN/             adapter_config.json adapter_model.safetensors meta.json
    ROOT/KIND/NAME/refs.json          aliases -> version numbers (current, candidate, ...)
    ROOT/KIND/NAME/replay.jsonl       the adapter's replay buffer      (file names: :mod:`persona.store.queues`)
    ROOT/KIND/NAME/pending.jsonl      interactions logged, not yet trained on
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from filelock import FileLock, Timeout

from .._fs import PRIVATE_MODE, atomic_write_json, read_regular_file
from ..errors import DamagedAdapter, InvalidName, LockTimeout, StoreDamaged, StoreNotInitialized, UnsupportedStoreFormat
from ..refs import AdapterRef, format_version, parse_ref

STORE_FORMAT = 1
STORE_FILE = "persona.json"
META = "meta.json"
REFS = "refs.json"
RETIRED = ".retired.json"
LOCKS = ".locks"
VERSION_DIR = re.compile(r"v([0-9]{4,9})")


def default_root() -> Path:
    """``$PERSONA_HOME``, else ``./adapters``."""
    return Path(os.environ.get("PERSONA_HOME") or "adapters")


def now() -> str:
    """The current UTC time as recorded in the store's files."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def id_digest(ref: AdapterRef) -> str:
    """An adapter's id as a file-name-safe hash (lock files, the retired-version record)."""
    return hashlib.sha256(ref.id.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StoreConfig:
    """The contents of ``persona.json``: which base this store is bound to."""

    format: int
    base_id: str
    base_fingerprint: str
    created: str


def read_store_config(root: Path) -> StoreConfig:
    """Parse ``ROOT/persona.json``: :class:`StoreNotInitialized` when absent, :class:`StoreDamaged` when bad."""
    path = root / STORE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreNotInitialized(f"no adapter store at {root}: run `persona init --store {root}` first") from None
    except ValueError as exc:
        raise StoreDamaged(f"{path} is not valid JSON ({exc}); the store is damaged") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise UnsupportedStoreFormat(f"{path} has store format {found!r}; this persona reads format {STORE_FORMAT}")
    base = data.get("base")
    if not (isinstance(base, dict) and isinstance(base.get("id"), str) and isinstance(base.get("fingerprint"), str)):
        raise StoreDamaged(f"{path} lacks the base's id and fingerprint; the store is damaged")
    return StoreConfig(format=data["format"], base_id=base["id"], base_fingerprint=base["fingerprint"],
                       created=str(data.get("created", "")))


class Layout:
    """Paths and locks of one store root; the base of :class:`~persona.store.Store`."""

    def __init__(self, root: str | os.PathLike | None = None, *, lock_timeout: float = 600.0):
        self.root = Path(root if root is not None else default_root()).expanduser().resolve()
        self.lock_timeout = lock_timeout
        self._config: StoreConfig | None = None

    @property
    def config(self) -> StoreConfig:
        """The store's base binding (read once from ``persona.json``)."""
        if self._config is None:
            self._config = read_store_config(self.root)
        return self._config

    # ----------------------------------------------------------------- paths
    def _adapter_dir(self, ref: str | AdapterRef) -> Path:
        """The folder of an adapter, after validating its name and checking it stays inside the root."""
        ref = parse_ref(ref)
        path = (self.root / ref.kind / ref.name).resolve()
        if path.parent != (self.root / ref.kind).resolve() or not path.is_relative_to(self.root):
            raise InvalidName(f"adapter path for {ref.id} resolves outside the store root {self.root}")
        for link in (self.root / ref.kind, self.root / ref.kind / ref.name):
            if link.is_symlink():  # even one pointing inside the root would serve one adapter as another
                raise InvalidName(f"{link} is a symlink; the store refuses symlinks under its root (remove it)")
        return path

    def _version_dir(self, ref: AdapterRef, version: int) -> Path:
        folder = self._adapter_dir(ref) / format_version(version)
        if folder.is_symlink():
            raise DamagedAdapter(
                f"{ref.id}@{format_version(version)} is a symlink; the store refuses symlinks under its root. "
                "Remove it (`persona verify` lists every symlink)",
                reason="the version folder is a symlink",
            )
        return folder

    def _symlinked(self, ref: AdapterRef) -> Path | None:
        """The adapter's folder entry when it is a symlink (never followed: it would serve one adapter as another)."""
        self.config  # noqa: B018
        link = self.root / ref.kind / ref.name
        return link if link.is_symlink() and not (self.root / ref.kind).is_symlink() else None

    def _version_numbers_in(self, folder: Path) -> list[int]:
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := VERSION_DIR.fullmatch(p.name)) and p.is_dir())

    # ----------------------------------------------------------------- retired version numbers
    # A version label (``user:alice@v0003``) names one set of weights forever: engines, the router's
    # cache and a vLLM resolver all cache by it. So a deleted adapter's numbers are never handed out
    # again: a re-created ``user:alice`` starts after the last version the deleted one had. The record
    # keys adapters by a hash of their id, so deleting a user leaves no file with their name.
    def _retired(self) -> dict[str, int]:
        path = self.root / RETIRED
        if not path.exists():
            return {}
        try:
            record = json.loads(read_regular_file(path))
            if not isinstance(record, dict) or not all(
                isinstance(k, str) and type(v) is int and v > 0 for k, v in record.items()
            ):
                raise ValueError("not an object of positive version numbers")
        except (OSError, ValueError) as exc:
            raise StoreDamaged(
                f"{path} is damaged ({exc}); it records the version numbers of deleted adapters so that they are "
                "never reused. Restore it from a backup, or remove it only if no engine has served a deleted adapter"
            ) from None
        return record

    def _first_version(self, ref: AdapterRef) -> int:
        """1 for a new name; for a re-created one, one past the last version its deleted namesake had."""
        return self._retired().get(id_digest(ref), 0) + 1

    def _retire(self, doomed: Sequence[tuple[AdapterRef, Sequence[int]]]) -> None:
        """Record the last version number of adapters about to be deleted (under the lineage lock)."""
        record = self._retired()
        for ref, numbers in doomed:
            if numbers:
                key = id_digest(ref)
                record[key] = max(record.get(key, 0), max(numbers))
        atomic_write_json(self.root / RETIRED, record, PRIVATE_MODE)

    def cache_dir(self, name: str) -> Path:
        """``ROOT/.cache/NAME``: derived data (router centroids, materialized merges), never the only copy of
        adapter data."""
        if not name.isidentifier():
            raise InvalidName(f"cache name {name!r} is not a plain identifier")
        return self.root / ".cache" / name

    # ----------------------------------------------------------------- locks
    @contextmanager
    def _file_lock(self, name: str, held: str) -> Iterator[None]:
        """Hold ``ROOT/.locks/<name>.lock``; :class:`LockTimeout` (saying ``held``) after ``lock_timeout``."""
        locks = self.root / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(locks / f"{name}.lock"), timeout=self.lock_timeout):
                yield
        except Timeout:
            raise LockTimeout(f"{held} for over {self.lock_timeout:.0f}s; try again later") from None

    def lock(self, ref: str | AdapterRef, purpose: str = "write"):
        """Hold one lock of an adapter: ``write`` serializes short writes (publish, alias, log);
        ``update`` serializes whole updates, so ``persona log`` never waits for a training run."""
        ref = parse_ref(ref)
        suffix = "" if purpose == "write" else f".{purpose}"
        return self._file_lock(f"{id_digest(ref)}{suffix}", f"another writer has held the lock of {ref.id}")

    def lineage_lock(self):
        """Serialize what reads an adapter into another (merge) with deletion, store-wide.

        Taken before any adapter lock, never while holding one.
        """
        return self._file_lock("lineage", "a merge or delete has held the store's lineage lock")
