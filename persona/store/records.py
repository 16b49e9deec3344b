"""The store's typed records: a version's ``meta.json`` (with its one strict parser), an adapter's
versions and aliases, a loaded version, and a problem found in either.

Every reader of a version goes through :func:`parse_meta`. A ``meta.json`` that is not JSON, lacks a
required key, holds a value of the wrong type, names a file that is not a plain file name of the
version folder, or claims another adapter or version than the folder it sits in raises
:class:`~persona.errors.DamagedAdapter` (issue 10, items 5-7): that adapter is damaged, never the
store. Keys added after format 1 was first written (``over``, ``pending``, ``imported``, ``origin``, ``memory``) are optional, so
older stores keep loading; unknown keys are ignored, so a newer persona's additions do not damage a version.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import DamagedAdapter, InvalidName, InvalidReference, PersonaError
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftConfig
from ..refs import CURRENT, AdapterRef, format_version, parse_ref

META_FORMAT = 1
# Training side files (an EWC Fisher estimate) are safetensors *bytes* under a name that does not end
# in ``.safetensors``: LoRAX and TGI load every ``*.safetensors`` of an adapter folder into one dict,
# and a Fisher keyed like the adapter overwrote its LoRA tensors there (issue 13). A suffix, not a
# subfolder, because it also escapes recursive and Hub-listing globs and keeps the folder flat.
SIDE_SUFFIX = ".train"
SIDE_NAME = re.compile(r"[a-z0-9_]{1,64}")
SIDE_FILE = re.compile(SIDE_NAME.pattern + re.escape(SIDE_SUFFIX))
# Versions written before issue 13 named side files ``NAME.safetensors``: still read and verified,
# never written (see :func:`side_file_names`).
LEGACY_SIDE_FILE = re.compile(SIDE_NAME.pattern + r"\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What a version's ``origin`` may say (a short tag such as ``auto-update``; shown by ``persona show``).
ORIGIN = re.compile(r"[a-z][a-z0-9-]{0,31}")
AUTO_UPDATE_ORIGIN = "auto-update"
# The held-out slice an update's gate evaluated on (issue 14): JSON Lines of interactions, a person's
# data, so written with mode 0600 like the replay buffer. A side-file name (``.train``), so a version
# holding one still reads in an older persona; the name ``heldout`` is therefore not for safetensors.
HELDOUT_NAME = "heldout"
HELDOUT_FILE = HELDOUT_NAME + SIDE_SUFFIX


def is_version_file_name(name: str) -> bool:
    """Whether ``name`` may appear in a version's ``files``: a plain name of the folder, nothing more
    (PEFT's two files, a side file, or a side file of the old naming)."""
    return name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) or bool(SIDE_FILE.fullmatch(name)
                                                             or LEGACY_SIDE_FILE.fullmatch(name))


def side_file_names(name: str) -> tuple[str, str]:
    """``(file written today, file of the old naming)`` of side file ``name`` (``fisher`` ->
    ``fisher.train``, ``fisher.safetensors``); :class:`InvalidName` unless ``name`` is a plain name."""
    if not SIDE_NAME.fullmatch(name or ""):
        raise InvalidName(f"side file name {name!r} must match {SIDE_NAME.pattern} (e.g. 'fisher'), with no suffix")
    return name + SIDE_SUFFIX, name + ".safetensors"


@dataclass(frozen=True)
class VersionInfo:
    """One published version, as recorded in its ``meta.json``."""

    adapter: str
    version: int
    parent: int | None
    created: str
    base_fingerprint: str
    files: Mapping[str, str]
    lora: Mapping[str, Any]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] | None = None
    data_digest: str | None = None
    lineage: tuple[Mapping[str, Any], ...] = ()
    aliases: tuple[str, ...] = ()
    over: Mapping[str, Any] | None = None  # the pinned adapter this one is layered on
    # The head of the pending queue this version was trained on, {"rows": N, "digest": sha256}:
    # what the next update skips if a crash left those rows in the queue (issue 10, item 11).
    pending: Mapping[str, Any] | None = None
    # Where an imported version came from: {"source": folder or Hub id, "revision": commit or null,
    # "files": {name: sha256 of the file as it was read}} (``persona import``); None otherwise.
    imported: Mapping[str, Any] | None = None
    # What published the version when it was not a person at a command: "auto-update" for the
    # server's learning loop (``persona serve --auto-update``); None (no key in meta.json) otherwise.
    origin: str | None = None
    # The memory snapshot the update saw, {"entries": N, "digest": sha256 of memory.jsonl} (issue 16);
    # None for versions not trained by an update, or written before memories existed.
    memory: Mapping[str, Any] | None = None

    @property
    def heldout_kept(self) -> bool:
        """Whether this version keeps the held-out slice its update was judged on (``Store.heldout``)."""
        return HELDOUT_FILE in self.files

    @property
    def over_ref(self) -> AdapterRef | None:
        if not self.over:
            return None
        kind, name = self.over["adapter"].split(":", 1)
        return AdapterRef(kind, name, version=int(self.over["version"]))

    @property
    def ref(self) -> AdapterRef:
        kind, name = self.adapter.split(":", 1)
        return AdapterRef(kind, name, version=self.version)

    @property
    def label(self) -> str:
        return format_version(self.version)

    def sources(self) -> list[tuple[AdapterRef, str]]:
        """The other adapter versions this one was built from: (pinned ref, relation), lineage then layer."""
        return lineage_sources(self.lineage, self.over)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "adapter": self.adapter,
            "version": self.version,
            "label": self.label,
            "parent": self.parent,
            "created": self.created,
            "base_fingerprint": self.base_fingerprint,
            "files": dict(self.files),
            "lora": dict(self.lora),
            "metrics": dict(self.metrics),
            "training": self.training,
            "data_digest": self.data_digest,
            "lineage": list(self.lineage),
            "aliases": list(self.aliases),
            "over": dict(self.over) if self.over else None,
            "pending": dict(self.pending) if self.pending else None,
        }
        if self.imported:  # as in meta.json: only an imported version has the key
            out["imported"] = dict(self.imported)
        if self.origin:  # the same: only a version the loop published has the key
            out["origin"] = self.origin
        if self.memory:
            out["memory"] = dict(self.memory)
        return out


def lineage_sources(lineage: Sequence[Mapping[str, Any]], over: Mapping[str, Any] | None) -> list[tuple[AdapterRef, str]]:
    """(pinned ref, relation) of each lineage entry and of the layer; ``InvalidReference`` if one is malformed."""
    out = []
    for entry in [*lineage, *([over] if over else [])]:
        try:
            _pinned(entry, "a lineage entry")
        except _Bad as bad:
            raise InvalidReference(f"{bad}: every lineage entry needs an adapter name and a version number") from None
        relation = "over" if entry is over else str(entry.get("relation") or "lineage")
        out.append((parse_ref(entry["adapter"]).at(entry["version"]), relation))
    return out


class _Bad(Exception):
    """One reason a meta.json is damaged."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, required: bool = False,
         nullable: bool = False, default: Any = None) -> Any:
    if key not in meta:
        if required:
            raise _Bad(f"missing key {key!r}")
        return default
    value = meta[key]
    if value is None and nullable:
        return None
    if kind is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Bad(f"{key!r} should be {names}{' or null' if nullable else ''}, not {type(value).__name__}")
    return value


def _pinned(entry: Any, where: str) -> dict[str, Any]:
    """An ``{"adapter": "kind:name", "version": N, ...}`` entry of the lineage or the layer."""
    if not isinstance(entry, dict):
        raise _Bad(f"{where} should be an object, not {type(entry).__name__}")
    adapter = _get(entry, "adapter", str, required=True)
    version = _get(entry, "version", int, required=True)
    try:
        ref = parse_ref(adapter)
    except PersonaError:
        raise _Bad(f"{where} names {adapter!r}, which is not an adapter name") from None
    if ref.id != adapter or version < 1:
        raise _Bad(f"{where} names {adapter!r} version {version}, which is not a published version")
    return entry


def _origin(meta: Mapping[str, Any]) -> str | None:
    origin = _get(meta, "origin", str, nullable=True)
    if origin is not None and not ORIGIN.fullmatch(origin):
        raise _Bad(f"'origin' {origin[:40]!r} should match {ORIGIN.pattern}")
    return origin


def _parse(meta: Any, adapter: str, version: int) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise _Bad(f"should hold a JSON object, not {type(meta).__name__}")
    fmt = _get(meta, "format", int, default=META_FORMAT)
    if fmt != META_FORMAT:
        raise _Bad(f"has format {fmt}; this persona reads format {META_FORMAT}")
    claimed = _get(meta, "adapter", str, required=True)
    number = _get(meta, "version", int, required=True)
    if (claimed, number) != (adapter, version):
        # A version folder copied from another adapter (or renamed) must not be served as this one.
        raise _Bad(f"claims to be {claimed}@{format_version(number) if number > 0 else number}, "
                   f"but it is in the folder of {adapter}@{format_version(version)}")
    parent = _get(meta, "parent", int, nullable=True)
    if parent is not None and not 1 <= parent < version:
        raise _Bad(f"parent {parent} is not an earlier version")
    files = _get(meta, "files", dict, required=True)
    for name, digest in files.items():
        if not is_version_file_name(name):
            raise _Bad(f"'files' names {name!r}, which is not a file a version folder may hold")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _Bad(f"'files' gives {name} a sha256 that is not 64 hex digits")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if name not in files:
            raise _Bad(f"'files' lacks {name}")
    lineage = _get(meta, "lineage", list, nullable=True, default=[]) or []
    over = _get(meta, "over", dict, nullable=True)
    if over is not None:
        _pinned(over, "'over'")
        if over["adapter"].startswith("user:"):
            raise _Bad("'over' names a user adapter; only domain and merged adapters are layered under others")
    pending = _get(meta, "pending", dict, nullable=True)
    if pending is not None:
        rows, digest = _get(pending, "rows", int, required=True), _get(pending, "digest", str, required=True)
        if rows < 1 or not _SHA256.fullmatch(digest):
            raise _Bad("'pending' should hold a positive row count and a sha256")
    memory = _get(meta, "memory", dict, nullable=True)
    if memory is not None:
        entries, digest = _get(memory, "entries", int, required=True), _get(memory, "digest", str, required=True)
        if entries < 0 or not _SHA256.fullmatch(digest):
            raise _Bad("'memory' should hold an entry count and a sha256")
    return {
        "adapter": claimed,
        "version": number,
        "parent": parent,
        "created": _get(meta, "created", str, required=True),
        "base_fingerprint": _get(meta, "base_fingerprint", str, required=True),
        "files": dict(files),
        "lora": _get(meta, "lora", dict, default={}),
        "metrics": _get(meta, "metrics", dict, nullable=True, default={}) or {},
        "training": _get(meta, "training", dict, nullable=True),
        "data_digest": _get(meta, "data_digest", str, nullable=True),
        "lineage": tuple(_pinned(e, f"'lineage' entry {i}") for i, e in enumerate(lineage)),
        "over": over,
        "pending": pending,
        "imported": _get(meta, "imported", dict, nullable=True),
        "origin": _origin(meta),
        "memory": memory,
    }


def parse_meta(raw: bytes, *, adapter: str, version: int, aliases: tuple[str, ...] = ()) -> VersionInfo:
    """The :class:`VersionInfo` of ``adapter@version`` from its ``meta.json`` bytes, or :class:`DamagedAdapter`.

    >>> parse_meta(b"{}", adapter="user:alice", version=1)   # doctest: +SKIP
    DamagedAdapter: user:alice@v0001: meta.json is damaged (missing key 'adapter') ...
    """
    where = f"{adapter}@{format_version(version)}"
    try:
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise _Bad(f"not valid JSON ({exc.__class__.__name__})") from None
        fields = _parse(meta, adapter, version)
    except _Bad as bad:
        raise DamagedAdapter(
            f"{where}: meta.json is damaged ({bad}); this version cannot be loaded. Roll back to another version "
            f"(`persona rollback {adapter} vN`) or delete the adapter (`persona delete {adapter}`)",
            reason=f"damaged meta.json: {bad}",
        ) from None
    return VersionInfo(aliases=aliases, **fields)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the store: where (adapter, version, file) and why."""

    adapter: str
    version: int | None
    path: str
    reason: str

    def __str__(self) -> str:
        where = self.adapter + (f"@{format_version(self.version)}" if self.version else "")
        return f"{where}: {self.path}: {self.reason}"


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter with all its versions and aliases."""

    adapter: str
    kind: str
    name: str
    versions: tuple[VersionInfo, ...]
    aliases: Mapping[str, int]
    pending: int
    replay: int
    # Why this adapter is damaged (unreadable meta.json or refs.json, a symlink, ...): ``versions``
    # then holds only its readable versions, and the damaged ones are refused for loading.
    damaged: tuple[Problem, ...] = ()

    @property
    def current(self) -> int | None:
        return self.aliases.get(CURRENT)

    @property
    def is_damaged(self) -> bool:
        return bool(self.damaged)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "kind": self.kind,
            "name": self.name,
            "current": self.current,
            "aliases": dict(self.aliases),
            "pending": self.pending,
            "replay": self.replay,
            "versions": [v.to_dict() for v in self.versions],
            "damaged": [str(p) for p in self.damaged],
        }


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter version read from the store, its hashes checked."""

    info: VersionInfo
    config: Mapping[str, Any]  # adapter_config.json as read; peft_config is its typed view
    tensors: Mapping[str, Any]

    @property
    def ref(self) -> AdapterRef:
        return self.info.ref

    @property
    def peft_config(self) -> PeftConfig:
        """``adapter_config.json``, typed (raises UnsupportedAdapter when it lacks ``r``/``lora_alpha``)."""
        return PeftConfig.from_json(self.config)
