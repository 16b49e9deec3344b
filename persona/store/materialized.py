"""Materialized adapters: single plain LoRA folders derived from stored versions (a stack merged by
``cat``, see :mod:`persona.compose.materialize`), cached by content under the store's cache::

    ROOT/.cache/merges/<key>/adapter_config.json adapter_model.safetensors manifest.json

``key`` is a sha256 the caller computes over everything the result depends on (pinned parts, their
weights' sha256, their weights in the stack, the base fingerprint), so the same inputs find the same
folder and different inputs never share one. An entry is built once, under its own lock (concurrent
callers wait, then reuse it), written to a temp folder and renamed into place, and re-hashed against
its manifest every time it is handed out: a tampered entry is rebuilt, never served.

The cache is bounded: every distinct stack or weight a client sends is one more entry, as large as its
parts together, so a build that would take the cache past ``PERSONA_MERGE_CACHE_MAX_BYTES`` (default
16 GiB) is refused with :class:`~persona.errors.MergeCacheFull` before anything is written; cached
entries are still served. Nothing is evicted automatically: an engine (vLLM) may still hold an
entry's path and reload it from there.

The manifest names the adapters an entry was built from by a hash of their id (the cache holds no user
name), so :func:`drop_built_from` (called by ``Store.delete``) removes every entry that holds a deleted
adapter's weights: a user's deleted weights do not live on in a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .._fs import TMP_PREFIX, dumps_json, fsync_tree, read_regular_file, remove_tree, temp_sibling
from ..errors import IntegrityError, InvalidConfig, InvalidName, MergeCacheFull
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..refs import AdapterRef
from .layout import Layout, id_digest, now

if TYPE_CHECKING:
    from .protocol import StoreView

CACHE = "merges"
MANIFEST = "manifest.json"
FORMAT = 1
KEY = re.compile(r"[0-9a-f]{64}")
MAX_BYTES_ENV = "PERSONA_MERGE_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 16 << 30
logger = logging.getLogger("persona.store")

# () -> (PEFT-keyed tensors, adapter_config.json): what to write when the entry has to be built
Build = Callable[[], "tuple[Mapping[str, Any], Mapping[str, Any]]"]


@dataclass(frozen=True)
class MaterializedFolder:
    """A checked entry of the cache: a plain PEFT folder any LoRA loader reads."""

    key: str
    path: Path
    files: Mapping[str, str]  # adapter_config.json / adapter_model.safetensors -> sha256
    built: bool  # True when this call built it, False when it reused a checked entry


def get_or_build(store: Layout, key: str, sources: Sequence[AdapterRef], build: Build) -> MaterializedFolder:
    """The entry ``key``, built from ``build()`` if it is absent or fails its hash check."""
    if not KEY.fullmatch(key):
        raise InvalidName(f"a materialized adapter's key is a sha256 hex digest, got {key!r}")
    folder = store.cache_dir(CACHE) / key
    with store._file_lock(f"merge-{key[:24]}", "another process has been building the same merged adapter"):
        found, reason = _checked(folder, key)
        if found is not None:
            return found
        if reason is not None:  # present but not what was written: never served, rebuilt below
            logger.warning("materialized adapter %s is damaged (%s); rebuilding it", key[:12], reason)
            _remove(folder)
        # Under the lineage lock a concurrent delete of a source either happens first (build() cannot
        # load it) or after this entry exists (and drops it): deleted weights do not live on in the cache.
        with store.lineage_lock():
            tensors, config = build()
            return _write(store, folder, key, sources, tensors, config)


def _write(store: Layout, folder: Path, key: str, sources: Sequence[AdapterRef], tensors: Mapping[str, Any],
           config: Mapping[str, Any]) -> MaterializedFolder:
    from safetensors.torch import save

    blobs = {ADAPTER_CONFIG: dumps_json(dict(config)),
             ADAPTER_WEIGHTS: save({k: v.contiguous() for k, v in tensors.items()})}
    _check_room(folder.parent, sum(len(b) for b in blobs.values()))
    files = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    manifest = {"format": FORMAT, "key": key, "files": files, "created": now(),
                "sources": sorted({id_digest(ref.unpinned()) for ref in sources}),
                "base_fingerprint": store.config.base_fingerprint}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    tmp.mkdir()
    try:
        for name, data in {**blobs, MANIFEST: dumps_json(manifest)}.items():
            (tmp / name).write_bytes(data)
        fsync_tree(tmp)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    return MaterializedFolder(key, folder, files, built=True)


def max_bytes() -> int:
    """The cache's size cap: ``$PERSONA_MERGE_CACHE_MAX_BYTES``, else 16 GiB."""
    text = os.environ.get(MAX_BYTES_ENV)
    if text is None or not text.strip():
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidConfig(f"{MAX_BYTES_ENV} must be a whole number of bytes >= 0, got {text!r}")
    return value


def _check_room(root: Path, size: int) -> None:
    """Refuse a new entry of ``size`` bytes that would take the cache past its cap (called under the
    lineage lock, which every build holds, so two builds cannot both pass on the same room)."""
    cap = max_bytes()
    used = sum(f.stat().st_size for f in root.glob("*/*") if f.is_file() and not f.is_symlink()) \
        if root.is_dir() else 0
    if used + size > cap:
        raise MergeCacheFull(
            f"the store's merge cache ({root}) holds {used:,} bytes; a new {size:,}-byte merged adapter would pass "
            f"its cap of {cap:,} ({MAX_BYTES_ENV}). Cached stacks are still served. Raise the cap, or remove "
            "entries no engine still serves (see docs/SCALING.md)"
        )


def _manifest(folder: Path) -> dict[str, Any]:
    data = json.loads(read_regular_file(folder / MANIFEST))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a manifest of this format")
    return data


def _checked(folder: Path, key: str) -> tuple[MaterializedFolder | None, str | None]:
    """``(entry, None)`` when intact; ``(None, None)`` when absent; ``(None, reason)`` when damaged."""
    if not folder.exists() and not folder.is_symlink():
        return None, None
    if folder.is_symlink() or not folder.is_dir():
        return None, "not a plain folder"
    try:
        manifest = _manifest(folder)
        files = manifest.get("files")
        if manifest.get("key") != key or not isinstance(files, dict) or set(files) != {ADAPTER_CONFIG, ADAPTER_WEIGHTS}:
            return None, "its manifest does not describe this entry"
        present = {p.name for p in folder.iterdir()}
        if present != set(files) | {MANIFEST}:
            return None, f"unexpected files {sorted(present - set(files) - {MANIFEST})}"
        for name, digest in files.items():
            if hashlib.sha256(read_regular_file(folder / name)).hexdigest() != digest:
                return None, f"{name} does not match its recorded sha256"
    except (OSError, ValueError, IntegrityError) as exc:
        return None, f"unreadable ({exc.__class__.__name__})"
    return MaterializedFolder(key, folder, dict(files), built=False), None


def drop_built_from(store: StoreView, refs: Sequence[AdapterRef]) -> int:
    """Remove every entry built from any of ``refs`` (and any entry whose manifest is unreadable:
    what it holds cannot be told); returns how many. Called with the lineage lock held."""
    root = store.cache_dir(CACHE)
    if not root.is_dir():
        return 0
    doomed = {id_digest(ref.unpinned()) for ref in refs}
    dropped = 0
    for entry in list(root.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            # Builds write their temp folder only under the lineage lock, which the caller holds: this
            # one is a crashed build's leftover, and it may hold any adapter's weights.
            sources = doomed
        else:
            try:
                sources = set(_manifest(entry).get("sources") or ())
            except (OSError, ValueError, IntegrityError):
                sources = doomed
        if sources & doomed:
            _remove(entry)
            dropped += 1
    return dropped


def _remove(path: Path) -> None:
    """Remove a cache entry: a folder whole (renamed away first), a symlink or a stray file itself."""
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)
