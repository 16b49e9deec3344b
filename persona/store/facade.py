"""The versioned adapter store: the source of truth for every adapter and every version.

Layout (see docs/STORE.md)::

    ROOT/persona.json                 format, base id, base fingerprint
    ROOT/.locks/<hash>.lock           one writer lock per adapter (named by hash: no user names)
    ROOT/KIND/NAME/vNNNN/             adapter_config.json adapter_model.safetensors meta.json
    ROOT/KIND/NAME/refs.json          aliases -> version numbers (current, candidate, ...)
    ROOT/KIND/NAME/replay.jsonl       the adapter's replay buffer
    ROOT/KIND/NAME/pending.jsonl      interactions logged, not yet trained on

Guarantees:
- Versions are immutable and published whole: files go to a hidden temp dir, are fsynced, and the
  dir is renamed to ``vNNNN`` in one ``os.replace``. A new adapter (its first version and its refs)
  appears the same way, in one rename of its whole folder.
- Aliases move by an atomic rewrite of ``refs.json``, after the version they name exists: refs never
  point at a missing version, whatever instant a crash hits.
- Writers to one adapter are serialized by a file lock; readers take no lock and, since nothing a
  reader can see is ever modified in place, never see a torn version.
- Loading re-hashes every file against ``meta.json``, checks the base fingerprint, and reads
  safetensors only (a pickle-format file in a version makes loading refuse before opening anything).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from filelock import FileLock, Timeout

from ..base import EMBEDDED_BASE, PICKLE_SUFFIXES, base_info, load_config
from ..errors import (
    AdapterExists,
    AdapterHasDependents,
    AdapterNotFound,
    BaseMismatch,
    DamagedAdapter,
    IntegrityError,
    InvalidName,
    InvalidReference,
    LockTimeout,
    NonFiniteWeights,
    StoreDamaged,
    StoreExists,
    StoreNotInitialized,
    UnsafeWeightFile,
    UnsupportedStoreFormat,
    VersionNotFound,
)
from .._fs import (
    PRIVATE_MODE,
    TMP_PREFIX,
    atomic_write_json,
    dumps_json,
    fsync_dir,
    fsync_tree,
    read_regular_file,
    remove_tree,
    sha256_file,
    remove_stale,
    symlinks_under,
    temp_sibling,
)
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, init_lora_tensors, lora_shapes, peft_adapter_config, resolve_targets
from .records import EXTRA_FILE, VersionInfo, lineage_sources, parse_meta
from ..refs import CURRENT, KINDS, RESERVED_NAMES, AdapterRef, format_version, parse_ref, validate_alias

STORE_FORMAT = 1
STORE_FILE = "persona.json"
META = "meta.json"
REFS = "refs.json"
REPLAY = "replay.jsonl"
PENDING = "pending.jsonl"
RETIRED = ".retired.json"  # last version number of each deleted adapter, keyed by a hash of its id
_VERSION_DIR = re.compile(r"v([0-9]{4,9})")


def default_root() -> Path:
    """``$PERSONA_HOME``, else ``./adapters``."""
    return Path(os.environ.get("PERSONA_HOME") or "adapters")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _id_digest(ref: AdapterRef) -> str:
    """An adapter's id as a file-name-safe hash (lock files, the retired-version record)."""
    return hashlib.sha256(ref.id.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StoreConfig:
    """The contents of ``persona.json``: which base this store is bound to."""

    format: int
    base_id: str
    base_fingerprint: str
    created: str


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
    config: Mapping[str, Any]
    tensors: Mapping[str, Any]

    @property
    def ref(self) -> AdapterRef:
        return self.info.ref


_RELATIONS = {"merge": "merged from", "from": "started from", "over": "layered on"}


@dataclass(frozen=True)
class Dependent:
    """``adapter`` depends on ``on``: merged from it, started from it (``from``) or layered on it (``over``)."""

    adapter: str
    on: str
    relation: str

    def describe(self) -> str:
        return f"{_RELATIONS.get(self.relation, 'derived from')} {self.on}"


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked and every mismatch it found."""

    adapters: int
    versions: int
    files: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "adapters": self.adapters,
            "versions": self.versions,
            "files": self.files,
            "problems": [p.__dict__ for p in self.problems],
        }


class Store:
    """A directory of versioned adapters bound to one base model.

    >>> store = Store.init("adapters", base="smollm2-135m-instruct")   # doctest: +SKIP
    >>> store.create("user:alice").label                               # doctest: +SKIP
    'v0001'
    """

    def __init__(self, root: str | os.PathLike | None = None, *, lock_timeout: float = 600.0):
        self.root = Path(root if root is not None else default_root()).expanduser().resolve()
        self.lock_timeout = lock_timeout
        self._config: StoreConfig | None = None

    # ----------------------------------------------------------------- binding to a base
    @classmethod
    def init(cls, root: str | os.PathLike | None = None, base: str = EMBEDDED_BASE) -> "Store":
        """Bind a new store at ``root`` to ``base`` (id + fingerprint). Idempotent for the same base."""
        store = cls(root)
        info = base_info(base)
        existing = store.root / STORE_FILE
        if existing.exists():
            config = store.config
            if config.base_fingerprint != info.fingerprint:
                raise StoreExists(
                    f"{store.root} is already bound to base {config.base_id} ({config.base_fingerprint[:19]}); "
                    "use another --store for another base"
                )
            return store
        store.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            existing,
            {"format": STORE_FORMAT, "base": {"id": info.id, "fingerprint": info.fingerprint}, "created": _now()},
        )
        return store

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Store":
        """Open an initialised store; raise :class:`StoreNotInitialized` if there is none."""
        store = cls(root)
        store.config  # noqa: B018 - validates persona.json
        return store

    @property
    def config(self) -> StoreConfig:
        if self._config is None:
            path = self.root / STORE_FILE
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                raise StoreNotInitialized(
                    f"no adapter store at {self.root}: run `persona init --store {self.root}` first"
                ) from None
            except ValueError as exc:
                raise StoreDamaged(f"{path} is not valid JSON ({exc}); the store is damaged") from None
            if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
                found = data.get("format") if isinstance(data, dict) else None
                raise UnsupportedStoreFormat(f"{path} has store format {found!r}; this persona reads format {STORE_FORMAT}")
            base = data.get("base")
            if not (isinstance(base, dict) and isinstance(base.get("id"), str) and isinstance(base.get("fingerprint"), str)):
                raise StoreDamaged(f"{path} lacks the base's id and fingerprint; the store is damaged")
            self._config = StoreConfig(
                format=data["format"],
                base_id=base["id"],
                base_fingerprint=base["fingerprint"],
                created=str(data.get("created", "")),
            )
        return self._config

    # ----------------------------------------------------------------- paths and locks
    def adapter_dir(self, ref: str | AdapterRef) -> Path:
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
        folder = self.adapter_dir(ref) / format_version(version)
        if folder.is_symlink():
            raise DamagedAdapter(
                f"{ref.id}@{format_version(version)} is a symlink; the store refuses symlinks under its root. "
                "Remove it (`persona verify` lists every symlink)",
                reason="the version folder is a symlink",
            )
        return folder

    # A version label (``user:alice@v0003``) names one set of weights forever: engines, the router's
    # cache and a vLLM resolver all cache by it. So a deleted adapter's numbers are never handed out
    # again: a re-created ``user:alice`` starts after the last version the deleted one had. The record
    # keys adapters by a hash of their id, so deleting a user leaves no file with their name.
    def _retired_path(self) -> Path:
        return self.root / RETIRED

    def _retired(self) -> dict[str, int]:
        path = self._retired_path()
        if not path.exists():
            return {}
        try:
            record = json.loads(read_regular_file(path))
            if not isinstance(record, dict) or not all(
                isinstance(k, str) and type(v) is int and v > 0 for k, v in record.items()
            ):
                raise ValueError("not an object of positive version numbers")
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"{path} is damaged ({exc}); it records the version numbers of deleted adapters so that they are "
                "never reused. Restore it from a backup, or remove it only if no engine has served a deleted adapter"
            ) from None
        return record

    def _first_version(self, ref: AdapterRef) -> int:
        """1 for a new name; for a re-created one, one past the last version its deleted namesake had."""
        return self._retired().get(_id_digest(ref), 0) + 1

    def _retire(self, refs: Sequence[AdapterRef]) -> None:
        """Record the last version number of adapters about to be deleted (under the lineage lock)."""
        record = self._retired()
        for ref in refs:
            numbers = self.version_numbers(ref)
            if numbers:
                key = _id_digest(ref)
                record[key] = max(record.get(key, 0), max(numbers))
        atomic_write_json(self._retired_path(), record, PRIVATE_MODE)

    @contextmanager
    def lock(self, ref: str | AdapterRef, purpose: str = "write") -> Iterator[None]:
        """Hold one lock of an adapter: ``write`` serializes short writes (publish, alias, log);
        ``update`` serializes whole updates, so ``persona log`` never waits for a training run."""
        ref = parse_ref(ref)
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        digest = _id_digest(ref)
        suffix = "" if purpose == "write" else f".{purpose}"
        try:
            with FileLock(str(locks / f"{digest}{suffix}.lock"), timeout=self.lock_timeout):
                yield
        except Timeout:
            raise LockTimeout(
                f"another writer has held the lock of {ref.id} for over {self.lock_timeout:.0f}s; try again later"
            ) from None

    # ----------------------------------------------------------------- reading
    def exists(self, ref: str | AdapterRef) -> bool:
        return (self.adapter_dir(ref) / REFS).is_file()

    def _require(self, ref: AdapterRef) -> Path:
        self.config  # noqa: B018
        path = self.adapter_dir(ref)
        if not (path / REFS).is_file():
            raise AdapterNotFound(f"no adapter {ref.id} in {self.root}: create it with `persona create {ref.id}`")
        return path

    def _read_refs(self, path: Path) -> dict[str, int]:
        """The aliases in ``refs.json``, parsed strictly: :class:`DamagedAdapter` when it is unreadable."""
        try:
            data = json.loads(read_regular_file(path / REFS))
        except FileNotFoundError:
            return {}
        except (IntegrityError, ValueError, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, IntegrityError) else f"not valid JSON ({exc.__class__.__name__})"
            data = {"damaged": reason}
        aliases = data.get("aliases") if isinstance(data, dict) else None
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in aliases.items()
        ):
            reason = data.get("damaged") if isinstance(data, dict) and "damaged" in data else "'aliases' should map names to version numbers"
            adapter = f"{path.parent.name}:{path.name}"
            raise DamagedAdapter(
                f"{adapter}: refs.json is damaged ({reason}); its aliases cannot be resolved. Pin a version "
                f"(`{adapter}@vN`), or delete the adapter (`persona delete {adapter}`)",
                reason=f"damaged refs.json: {reason}",
            )
        return dict(aliases)

    def _alias_names(self, ref: AdapterRef) -> dict[str, int]:
        """Aliases, only to name a pinned version's aliases: a damaged refs.json names none."""
        try:
            return self._read_refs(self.adapter_dir(ref))
        except DamagedAdapter:
            return {}

    def version_numbers(self, ref: str | AdapterRef) -> list[int]:
        path = self._require(parse_ref(ref))
        return sorted(int(m.group(1)) for p in path.iterdir() if (m := _VERSION_DIR.fullmatch(p.name)) and p.is_dir())

    def aliases(self, ref: str | AdapterRef) -> dict[str, int]:
        return self._read_refs(self._require(parse_ref(ref)))

    def resolve(self, ref: str | AdapterRef) -> AdapterRef:
        """Pin a reference to a version number (``user:alice`` -> ``user:alice@v3``)."""
        ref = parse_ref(ref)
        path = self._require(ref)
        if ref.version is not None:
            version = ref.version
        else:
            aliases = self._read_refs(path)
            if ref.selector not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise VersionNotFound(f"{ref.id} has no alias {ref.selector!r} (aliases: {known})")
            version = aliases[ref.selector]
        if not (path / format_version(version) / META).is_file():
            raise VersionNotFound(f"{ref.id} has no version {format_version(version)}; see `persona show {ref.id}`")
        return ref.at(version)

    def _read_meta(self, ref: AdapterRef, version: int, aliases: Mapping[str, int] | None = None) -> VersionInfo:
        """The strictly parsed ``meta.json`` of a version (see :mod:`persona.meta`); :class:`DamagedAdapter` if bad."""
        path = self._version_dir(ref, version) / META
        try:
            raw = read_regular_file(path)
        except FileNotFoundError:
            raise VersionNotFound(f"{ref.id} has no version {format_version(version)}") from None
        except IntegrityError as exc:
            raise DamagedAdapter(str(exc), reason="meta.json is a symlink or not a regular file") from None
        names = tuple(sorted(a for a, v in (aliases or {}).items() if v == version))
        return parse_meta(raw, adapter=ref.unpinned().id, version=version, aliases=names)

    def version_info(self, ref: str | AdapterRef) -> VersionInfo:
        pinned = self.resolve(ref)
        return self._read_meta(pinned, pinned.version, self._alias_names(pinned))

    def versions(self, ref: str | AdapterRef) -> list[VersionInfo]:
        """Every readable version of an adapter, oldest first (``show`` also reports the damaged ones)."""
        return list(self.show(ref).versions)

    def _scan_versions(self, ref: AdapterRef, aliases: Mapping[str, int]) -> tuple[list[VersionInfo], list[Problem]]:
        good, damaged = [], []
        for number in self.version_numbers(ref):
            try:
                good.append(self._read_meta(ref, number, aliases))
            except DamagedAdapter as exc:
                damaged.append(Problem(ref.id, number, META, exc.reason))
        return good, damaged

    def _count_lines(self, path: Path) -> int:
        try:
            return sum(1 for line in read_regular_file(path).split(b"\n") if line.strip())
        except FileNotFoundError:
            return 0

    def _symlinked(self, ref: AdapterRef) -> Path | None:
        """The adapter's folder entry when it is a symlink (never followed: it would serve one adapter as another)."""
        self.config  # noqa: B018
        link = self.root / ref.kind / ref.name
        return link if link.is_symlink() and not (self.root / ref.kind).is_symlink() else None

    def show(self, ref: str | AdapterRef) -> AdapterInfo:
        """An adapter's versions, aliases and queue sizes; a damaged adapter is reported, not raised."""
        ref = parse_ref(ref).unpinned()
        if (link := self._symlinked(ref)) is not None:  # reported as damaged, its target never read
            reason = "symlink (the store refuses symlinks under its root; `persona delete` removes the link only)"
            return AdapterInfo(adapter=ref.id, kind=ref.kind, name=ref.name, versions=(), aliases={}, pending=0,
                               replay=0, damaged=(Problem(ref.id, None, str(link.relative_to(self.root)), reason),))
        path = self._require(ref)
        damaged: list[Problem] = []
        try:
            aliases = self._read_refs(path)
        except DamagedAdapter as exc:
            aliases = {}
            damaged.append(Problem(ref.id, None, REFS, exc.reason))
        versions, bad = self._scan_versions(ref, aliases)
        damaged += bad
        counts = {}
        for name in (PENDING, REPLAY):
            try:
                counts[name] = self._count_lines(path / name)
            except IntegrityError as exc:
                counts[name] = 0
                damaged.append(Problem(ref.id, None, name, str(exc).replace(str(path / name), "it")))
        return AdapterInfo(
            adapter=ref.id,
            kind=ref.kind,
            name=ref.name,
            versions=tuple(versions),
            aliases=aliases,
            pending=counts[PENDING],
            replay=counts[REPLAY],
            damaged=tuple(damaged),
        )

    def list(self, kind: str | None = None) -> list[AdapterInfo]:
        """Every adapter in the store (optionally of one kind), sorted by reference."""
        self.config  # noqa: B018
        found = []
        for k in KINDS if kind is None else (kind,):
            folder = self.root / k
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                if child.name.startswith(TMP_PREFIX) or not (child.is_symlink() or (child / REFS).is_file()):
                    continue
                try:
                    found.append(self.show(AdapterRef(k, child.name)))
                except InvalidName:
                    continue  # a stray folder whose name is not an adapter name
        return found

    # ----------------------------------------------------------------- writing
    def create(
        self,
        ref: str | AdapterRef,
        settings: LoraSettings | None = None,
        *,
        tensors: Mapping[str, Any] | None = None,
        adapter_config: Mapping[str, Any] | None = None,
        lineage: tuple[Mapping[str, Any], ...] = (),
        over: str | AdapterRef | None = None,
        source: str | AdapterRef | None = None,
    ) -> VersionInfo:
        """Create an adapter and publish its first version: v0001 (or, for a name deleted before, the number
        after the deleted adapter's last version, so that no version label ever names two sets of weights).

        By default the weights are a fresh LoRA for the store's base (B = 0, so the base's outputs
        are unchanged); ``tensors`` + ``adapter_config`` start it from given weights instead, and
        ``source`` (``--from``) from a copy of another adapter's version, recorded in the lineage.
        ``over`` layers the new adapter on a domain (or merged) adapter pinned at its version now:
        updates train only the new adapter, inference applies both.

        >>> store.create("user:alice", over="domain:finance")    # doctest: +SKIP
        """
        ref = parse_ref(ref)
        if ref.version is not None or ref.alias is not None:
            raise InvalidReference(f"create takes an adapter without a version: {ref.id}, not {ref}")
        if ref.name in RESERVED_NAMES:
            raise InvalidName(f"{ref.name!r} is a reserved name ({ref.kind}:{ref.name} has a special meaning)")
        over_meta = self._layer_target(ref, over) if over is not None else None
        if source is not None:
            if tensors is not None:
                raise InvalidReference("give either source (--from) or tensors, not both")
            src = parse_ref(source)
            if src.kind == "user" and src.id != ref.id:
                raise InvalidReference(
                    f"cannot start {ref.id} from {src.id}: a user adapter holds that user's data; start from a domain "
                    "or merged (cohort) adapter instead"
                )
            loaded = self.load(src)
            tensors, adapter_config = loaded.tensors, loaded.config
            lineage = tuple(lineage) + ({
                "adapter": loaded.info.adapter, "version": loaded.info.version,
                "sha256": loaded.info.files.get(ADAPTER_WEIGHTS), "relation": "from",
            },)
            settings = settings or LoraSettings.from_peft(adapter_config)
        settings = settings or LoraSettings()
        path = self.adapter_dir(ref)
        if tensors is None:
            config = load_config(self.config.base_id)
            targets = resolve_targets(settings, config.model_type)
            settings = replace(settings, target_modules=targets)  # record what was resolved
            tensors = init_lora_tensors(lora_shapes(config, targets), settings)
            adapter_config = peft_adapter_config(settings, targets, self.config.base_id)
        elif adapter_config is None:
            raise InvalidReference("create(tensors=...) needs the matching adapter_config")
        self._check_shared_lineage(ref, lineage, over_meta)
        # A child of another adapter (--from, --over) is published under the lineage lock, after
        # checking its parent still exists, so a concurrent delete cannot miss it.
        derived = [parse_ref(r) for r in (source, over) if r is not None]
        with self.lineage_lock() if derived else nullcontext(), self.lock(ref):
            for parent in derived:
                if not self.exists(parent):
                    raise AdapterNotFound(f"{parent.id} was deleted while {ref.id} was being created from it")
            if (path / REFS).is_file():
                raise AdapterExists(f"{ref.id} already exists; use `persona update` to train it, or delete it first")
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path.parent, ref.name)  # a crashed create's or delete's staging
            if path.exists():  # leftovers of a crashed create: never published, safe to clear
                remove_tree(path)
            first = self._first_version(ref)
            staging = temp_sibling(path)
            staging.mkdir()
            try:
                info = self._write_version(
                    staging / format_version(first), ref, first, tensors, adapter_config, settings=settings,
                    lineage=lineage, over=over_meta,
                )
                (staging / REFS).write_bytes(dumps_json({"aliases": {CURRENT: first}}))
                fsync_tree(staging)
                os.replace(staging, path)
                fsync_dir(path.parent)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return replace(info, aliases=(CURRENT,))

    def publish_version(
        self,
        ref: str | AdapterRef,
        tensors: Mapping[str, Any],
        adapter_config: Mapping[str, Any],
        *,
        parent: int | None,
        set_alias: str | None = CURRENT,
        metrics: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
        data_digest: str | None = None,
        lineage: tuple[Mapping[str, Any], ...] = (),
        extra_files: Mapping[str, Mapping[str, Any]] | None = None,
        settings: LoraSettings | None = None,
        over: Mapping[str, Any] | None = None,
        pending: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        """Publish the next version of an existing adapter and (optionally) point an alias at it.

        The version number is allocated under the adapter's lock, so concurrent publishers get
        unique, increasing numbers. ``extra_files`` maps ``name.safetensors`` to tensors stored beside
        the version (an EWC Fisher estimate, for example). ``pending`` records the head of the
        pending queue the version was trained on (``{"rows": N, "digest": ...}``, see
        :mod:`persona.pending`), so a crash before the queue is consumed does not train it twice.
        """
        ref = parse_ref(ref).unpinned()
        if set_alias is not None:
            validate_alias(set_alias)
        self._check_shared_lineage(ref, lineage, over, parent)
        with self.lock(ref):
            path = self._require(ref)
            remove_stale(path)  # left by a crashed writer; we hold the lock
            numbers = self.version_numbers(ref)
            if parent is not None and parent not in numbers:
                raise VersionNotFound(f"parent version {format_version(parent)} of {ref.id} does not exist")
            version = (numbers[-1] if numbers else 0) + 1
            if over is None and parent is not None:  # a layered adapter stays on its layer
                over = self._read_meta(ref, parent).over
            final = path / format_version(version)
            staging = temp_sibling(final)
            try:
                self._write_version(
                    staging, ref, version, tensors, adapter_config,
                    parent=parent, metrics=metrics, training=training, data_digest=data_digest,
                    lineage=lineage, extra_files=extra_files, settings=settings, over=over, pending=pending,
                )
                fsync_tree(staging)
                os.replace(staging, final)
                fsync_dir(path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if set_alias is not None:
                self._set_alias_locked(ref, path, set_alias, version)
        return self.version_info(ref.at(version))

    def _write_version(
        self,
        folder: Path,
        ref: AdapterRef,
        version: int,
        tensors: Mapping[str, Any],
        adapter_config: Mapping[str, Any],
        *,
        parent: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
        data_digest: str | None = None,
        lineage: tuple[Mapping[str, Any], ...] = (),
        extra_files: Mapping[str, Mapping[str, Any]] | None = None,
        settings: LoraSettings | None = None,
        over: Mapping[str, Any] | None = None,
        pending: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        from safetensors.torch import save_file

        _check_finite(ref, version, tensors, extra_files)
        folder.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_bytes(dumps_json(dict(adapter_config)))
        for name, extra in (extra_files or {}).items():
            if not EXTRA_FILE.fullmatch(name) or name == ADAPTER_WEIGHTS:
                raise InvalidName(f"extra version file {name!r} must match {EXTRA_FILE.pattern}")
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(folder / name), metadata={"format": "pt"})
        files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
        lora = settings.to_dict() if settings else _settings_from_peft(adapter_config)
        meta = {
            "format": STORE_FORMAT,
            "adapter": ref.id,
            "version": version,
            "parent": parent,
            "created": _now(),
            "base_id": self.config.base_id,
            "base_fingerprint": self.config.base_fingerprint,
            "files": files,
            "lora": lora,
            "metrics": dict(metrics or {}),
            "training": dict(training) if training else None,
            "data_digest": data_digest,
            "lineage": list(lineage),
            "over": dict(over) if over else None,
            "pending": dict(pending) if pending else None,
        }
        raw = dumps_json(meta)
        # What is published must read back: the same strict parser every reader uses checks it now.
        try:
            info = parse_meta(raw, adapter=ref.id, version=version)
        except DamagedAdapter as exc:
            raise InvalidReference(f"refusing to publish {ref.id}@{format_version(version)}: its {exc.reason}") from None
        (folder / META).write_bytes(raw)
        return info

    def _layer_target(self, ref: AdapterRef, over: str | AdapterRef) -> dict[str, Any]:
        """Pin the adapter ``ref`` will be layered on, checking the layering rules."""
        target = parse_ref(over)
        if ref.kind != "user":
            raise InvalidReference(f"only user adapters are layered (--over); {ref.id} is a {ref.kind} adapter")
        if target.kind == "user":
            raise InvalidReference(f"{ref.id} cannot be layered over another user's adapter ({target.id}); use a domain or merged adapter")
        info = self.version_info(target)  # only user adapters are layered, so the target is never layered itself
        return {"adapter": info.adapter, "version": info.version, "sha256": info.files.get(ADAPTER_WEIGHTS)}

    def _set_alias_locked(self, ref: AdapterRef, path: Path, alias: str, version: int) -> None:
        if not (path / format_version(version) / META).is_file():
            raise VersionNotFound(f"{ref.id} has no version {format_version(version)}; see `persona show {ref.id}`")
        aliases = self._read_refs(path)
        aliases[alias] = version
        atomic_write_json(path / REFS, {"aliases": aliases})

    def set_alias(self, ref: str | AdapterRef, alias: str, version: int | str) -> None:
        """Point ``alias`` of an adapter at an existing version (atomic)."""
        from ..refs import parse_version

        ref = parse_ref(ref)
        validate_alias(alias)
        number = parse_version(version)
        with self.lock(ref):
            self._set_alias_locked(ref, self._require(ref), alias, number)

    def remove_alias(self, ref: str | AdapterRef, alias: str) -> None:
        ref = parse_ref(ref)
        if alias == CURRENT:
            raise InvalidName("the current alias cannot be removed; use rollback to move it")
        with self.lock(ref):
            path = self._require(ref)
            aliases = self._read_refs(path)
            if aliases.pop(alias, None) is None:
                raise VersionNotFound(f"{ref.id} has no alias {alias!r}")
            atomic_write_json(path / REFS, {"aliases": aliases})

    def rollback(self, ref: str | AdapterRef, version: int | str) -> None:
        """Move ``current`` to an earlier (or any existing) version."""
        self.set_alias(ref, CURRENT, version)

    def delete(self, ref: str | AdapterRef, *, cascade: bool = False) -> tuple[str, ...]:
        """Purge every file of an adapter: versions, refs, replay buffer, pending interactions.

        An adapter others depend on (merged from it, started from it, layered on it; see
        :meth:`dependents`) is refused with :class:`AdapterHasDependents` listing them, unless
        ``cascade=True``, which deletes them too, most derived first. Returns the adapters deleted.
        """
        ref = parse_ref(ref)
        if ref.version is not None or ref.alias is not None:
            raise InvalidReference(f"delete removes a whole adapter: pass {ref.id}, not {ref}")
        if (link := self._symlinked(ref)) is not None:
            with self.lock(ref):  # the link itself, never what it points to (often another adapter)
                link.unlink(missing_ok=True)
            return self._revoke_tokens((ref.id,))
        with self.lineage_lock(), self.lock(ref):
            path = self._require(ref)
            dependents = self.dependents(ref)
            if dependents and not cascade:
                listing = ", ".join(f"{d.adapter} ({d.describe()})" for d in dependents)
                raise AdapterHasDependents(
                    f"{ref.id} has {len(dependents)} dependent adapter(s): {listing}. Delete them first, or "
                    f"delete them too with `persona delete {ref.id} --cascade`",
                    tuple(d.adapter for d in dependents),
                )
            self._retire([parse_ref(d.adapter) for d in dependents] + [ref])
            # Most derived first: a crash part-way leaves the source, never a merge whose source is gone.
            for dependent in dependents:
                with self.lock(dependent.adapter):
                    remove_tree(self.adapter_dir(dependent.adapter))
            remove_tree(path)
        return self._revoke_tokens(tuple(d.adapter for d in dependents) + (ref.id,))

    def _revoke_tokens(self, deleted: tuple[str, ...]) -> tuple[str, ...]:
        """Revoke the server tokens of deleted adapters (they name the user); returns ``deleted``."""
        from .tokens import TokenStore

        tokens = TokenStore(self)
        for adapter in deleted:
            tokens.revoke_subject(adapter)
        return deleted

    # ----------------------------------------------------------------- lineage
    @contextmanager
    def lineage_lock(self) -> Iterator[None]:
        """Serialize what reads an adapter into another (merge) with deletion, store-wide.

        Taken before any adapter lock, never while holding one.
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(locks / "lineage.lock"), timeout=self.lock_timeout):
                yield
        except Timeout:
            raise LockTimeout(f"a merge or delete has held the store's lineage lock for over {self.lock_timeout:.0f}s") from None

    def dependents(self, ref: str | AdapterRef) -> list["Dependent"]:
        """Adapters that depend on ``ref``, directly or through each other, most derived first.

        A dependent names ``ref`` (any version) in the ``lineage`` of one of its versions (a merge,
        a ``--from`` copy) or is layered on it (``over``).
        """
        root = parse_ref(ref).id
        edges: dict[str, list[Dependent]] = {}  # adapter -> the adapters depending on it
        for adapter in self.list():
            for version in adapter.versions:
                sources = [(e.get("adapter"), e.get("relation") or "lineage") for e in version.lineage]
                if version.over:
                    sources.append((version.over.get("adapter"), "over"))
                for source, relation in sources:
                    if source and source != adapter.adapter:
                        edges.setdefault(source, []).append(Dependent(adapter.adapter, source, relation))
        order: list[Dependent] = []
        seen = {root}

        def visit(node: str) -> None:  # post-order: every adapter after all that depend on it
            for dep in edges.get(node, ()):
                if dep.adapter not in seen:
                    seen.add(dep.adapter)
                    visit(dep.adapter)
                    order.append(dep)

        visit(root)
        return order

    def _user_ancestry(self, sources: Sequence[tuple[AdapterRef, str]], owner: str | None = None) -> list[str] | None:
        """A lineage path from one of ``sources`` (pinned versions) to a user adapter other than
        ``owner`` (an adapter id whose own versions are followed, not refused), else None.

        Follows every edge a version was built from: merge parents and ``--from`` sources (its
        lineage), the layer it sits on (``over``) and the version it was trained from (``parent``).
        A link that cannot be read (deleted, damaged) cannot be shown to be user-free: refused.
        """
        stack = [(ref, relation, [f"{ref} ({relation})"]) for ref, relation in sources]
        seen: set[AdapterRef] = set()
        while stack:
            ref, relation, path = stack.pop()
            if ref.kind == "user" and ref.id != owner:
                return path
            if ref in seen:
                continue
            seen.add(ref)
            try:
                info = self._read_meta(ref, ref.version)
            except (AdapterNotFound, VersionNotFound, DamagedAdapter, InvalidName) as exc:
                raise InvalidReference(
                    f"cannot show that {ref} holds no user's data: {exc}".rstrip(".")
                ) from None
            nxt = list(info.sources())
            if info.parent is not None:
                nxt.append((ref.at(info.parent), "parent"))
            stack += [(r, rel, path + [f"{r} ({rel})"]) for r, rel in nxt]
        return None

    def _check_shared_lineage(self, ref: AdapterRef, lineage: Sequence[Mapping[str, Any]],
                              over: Mapping[str, Any] | None, parent: int | None = None) -> None:
        """A domain adapter reaches every user's token: refuse one built, by any path, from a user adapter.
        A user adapter reaches its user's token: refuse one built from another user's adapter, also
        through a merge (``merge user:alice … --into merged:m`` then ``create user:eve --from merged:m``)."""
        if ref.kind not in ("domain", "user"):
            return  # merged adapters are served to admin tokens only
        sources = lineage_sources(lineage, over)
        # A user's own earlier versions passed this check when they were published: only the new
        # edges need following (and a missing parent stays publish's VersionNotFound).
        if parent is not None and ref.kind == "domain":
            sources.append((ref.unpinned().at(parent), "parent"))
        owner = ref.id if ref.kind == "user" else None
        path = self._user_ancestry(sources, owner)
        if path and ref.kind == "domain":
            raise InvalidReference(
                f"{ref.id} is a shared domain adapter (every user's token reaches it) and cannot descend from a user "
                f"adapter: {ref.id} <- {' <- '.join(path)}. Build it from domain adapters only"
            )
        if path:
            raise InvalidReference(
                f"{ref.id} is reached by its user's token and cannot descend from another user's adapter: "
                f"{ref.id} <- {' <- '.join(path)}. Start it from domain adapters, or a merge of domain adapters"
            )

    # ----------------------------------------------------------------- integrity
    def _version_problems(self, ref: AdapterRef, version: int) -> tuple[list[Problem], int]:
        try:
            info = self._read_meta(ref, version)  # strict: also checks the version is where it claims
        except DamagedAdapter as exc:
            return [Problem(ref.id, version, META, exc.reason)], 0
        folder = self._version_dir(ref, version)
        problems: list[Problem] = []
        fp = info.base_fingerprint
        if fp != self.config.base_fingerprint:
            problems.append(Problem(ref.id, version, META, f"bound to another base ({fp[:19]}), store base is {self.config.base_fingerprint[:19]}"))
        present = {p.name for p in folder.iterdir()} - {META}
        for name in sorted(present - set(info.files)):
            kind = "pickle weight file (never loaded)" if name.endswith(PICKLE_SUFFIXES) else "unexpected file"
            problems.append(Problem(ref.id, version, name, kind))
        for name, digest in sorted(info.files.items()):
            if name not in present:
                problems.append(Problem(ref.id, version, name, "missing"))
            elif (folder / name).is_symlink():
                continue  # reported by the store-wide symlink scan
            elif sha256_file(folder / name) != digest:
                problems.append(Problem(ref.id, version, name, "sha256 mismatch: the file changed after it was published"))
        if ref.kind == "domain":
            path = self._user_ancestry(info.sources())
            if path:
                problems.append(Problem(ref.id, version, META, f"a shared domain adapter descends from a user adapter: {' <- '.join(path)}"))
        return problems, len(info.files)

    def verify(self, ref: str | AdapterRef | None = None) -> VerifyReport:
        """Re-hash every file of every version (of one adapter, or all) and report each mismatch,
        damaged metadata, version in the wrong folder, symlink, and domain adapter descending from a user."""
        problems: list[Problem] = []
        if ref is None:
            # a symlinked adapter folder is reported by the symlink scan below, its target never read
            adapters = [r for a in self.list() if self._symlinked(r := AdapterRef(a.kind, a.name)) is None]
            scan = self.root
        else:
            parsed = parse_ref(ref)
            self._require(parsed)
            adapters = [parsed.unpinned()]
            scan = self.adapter_dir(parsed)
        for link in symlinks_under(scan):
            where = link.parts
            owner = f"{where[0]}:{where[1]}" if scan == self.root and len(where) >= 2 and where[0] in KINDS else (
                parse_ref(ref).unpinned().id if ref is not None else "store")
            problems.append(Problem(owner, None, str(link), "symlink (the store refuses symlinks under its root; remove it)"))
        n_versions = n_files = 0
        for adapter in adapters:
            numbers = self.version_numbers(adapter)
            wanted = [self.resolve(ref).version] if ref is not None and (parse_ref(ref).version or parse_ref(ref).alias) else numbers
            for version in wanted:
                found, files = self._version_problems(adapter, version)
                problems += found
                n_versions += 1
                n_files += files
            try:
                aliases = self._read_refs(self.adapter_dir(adapter))
            except DamagedAdapter as exc:
                problems.append(Problem(adapter.id, None, REFS, exc.reason))
                continue
            for alias, version in aliases.items():
                if version not in numbers:
                    problems.append(Problem(adapter.id, None, REFS, f"alias {alias!r} points at missing version {format_version(version)}"))
        return VerifyReport(len(adapters), n_versions, n_files, tuple(problems))

    def load(self, ref: str | AdapterRef, *, base_fingerprint: str | None = None) -> LoadedAdapter:
        """Read one version's tensors, refusing tampered files, another base, and pickle files.

        Each file is read once into memory, hashed, and parsed from those same bytes, so what is
        checked is what is used.
        """
        from safetensors.torch import load as load_safetensors

        pinned = self.resolve(ref)
        folder = self._version_dir(pinned, pinned.version)  # DamagedAdapter for a symlinked version
        pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UnsafeWeightFile(
                f"{pinned}: refusing to load: {', '.join(pickles)} is a pickle-format file; persona reads "
                "safetensors only. Remove the file (`persona verify` lists such files)"
            )
        info = self._read_meta(pinned, pinned.version, self._alias_names(pinned))
        expected = base_fingerprint or self.config.base_fingerprint
        if info.base_fingerprint != expected:
            raise BaseMismatch(
                f"{pinned} was made on another base ({info.base_fingerprint[:19]}) than this one ({expected[:19]}); "
                "an adapter only works on the base it was trained on"
            )
        blobs: dict[str, bytes] = {}
        for name, digest in info.files.items():
            if not name.endswith((".json", ".safetensors")):
                raise UnsafeWeightFile(f"{pinned}: {name} is not a JSON or safetensors file")
            data = self._read_version_file(pinned, folder, name)
            if hashlib.sha256(data).hexdigest() != digest:
                raise IntegrityError(
                    f"{pinned}: {name} does not match the sha256 recorded at publish time; it was modified or "
                    "corrupted. Run `persona verify` and roll back to a good version"
                )
            blobs[name] = data
        config = json.loads(blobs[ADAPTER_CONFIG])
        tensors = load_safetensors(blobs[ADAPTER_WEIGHTS])
        return LoadedAdapter(info=info, config=config, tensors=tensors)

    def _read_version_file(self, pinned: AdapterRef, folder: Path, name: str) -> bytes:
        """A file named in a version's meta.json: only inside that folder (containment), never a symlink."""
        path = (folder / name).resolve()
        if path.parent != folder.resolve() or path.name != name:
            raise DamagedAdapter(f"{pinned}: meta.json names {name!r}, which is not a file of the version folder",
                                 reason=f"names {name!r}, outside the version folder")
        try:
            return read_regular_file(folder / name)
        except FileNotFoundError:
            raise IntegrityError(f"{pinned}: {name} is missing; run `persona verify` and roll back to a good version") from None

    def load_extra(self, ref: str | AdapterRef, name: str) -> dict[str, Any] | None:
        """Read an extra ``*.safetensors`` file stored beside a version (None when absent), hash-checked."""
        from safetensors.torch import load as load_safetensors

        info = self.version_info(ref)
        if name not in info.files:
            return None
        data = self._read_version_file(info.ref, self._version_dir(info.ref, info.version), name)
        if hashlib.sha256(data).hexdigest() != info.files[name]:
            raise IntegrityError(f"{info.ref}: {name} does not match its recorded sha256")
        return load_safetensors(data)


def _check_finite(ref: AdapterRef, version: int, tensors: Mapping[str, Any],
                  extra_files: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Refuse NaN or infinity in anything about to be published (issue 10, item 9): every path
    (create, create from tensors, --from, update, merge) ends here, before a file is written."""
    import torch

    groups = [(ADAPTER_WEIGHTS, tensors)] + list((extra_files or {}).items())
    bad = [f"{key}" for _, group in groups for key, t in group.items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteWeights(
            f"refusing to publish {ref.id}@{format_version(version)}: {len(bad)} tensor(s) hold NaN or infinity "
            f"(first: {bad[0]}); nothing was written. For an update lower the learning rate; for a merge use "
            "smaller weights"
        )


def _settings_from_peft(adapter_config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "rank": adapter_config.get("r"),
        "alpha": adapter_config.get("lora_alpha"),
        "dropout": adapter_config.get("lora_dropout"),
        "target_modules": sorted(adapter_config.get("target_modules") or []),
    }
