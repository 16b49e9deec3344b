"""The versioned adapter store: the source of truth for every adapter and every version.

:class:`Store` is the facade everyone else uses; each of its jobs lives in one module beside it:

- :mod:`~persona.store.layout`: paths, the base binding, locks;
- :mod:`~persona.store.records`: typed records (``VersionInfo``, ``AdapterInfo``) and the strict meta parser;
- :mod:`~persona.store.publish`: atomic publishing of versions, new adapters and aliases;
- :mod:`~persona.store.integrity`: hashing, ``verify``, checked loading;
- :mod:`~persona.store.lineage`: dependents, the no-user-data-in-shared-adapters rule, cascade delete;
- :mod:`~persona.store.queues`: the replay buffer and the pending queue;
- :mod:`~persona.store.memory`: a user adapter's retrieval memory of logged interactions;
- :mod:`~persona.store.tokens`: the API tokens.

Writers to one adapter are serialized by a file lock; readers take no lock and, since nothing a
reader can see is ever modified in place, never see a torn version. Only this package opens files
under a store root: the trainer, the router, the server and the CLI ask the Store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._fs import TMP_PREFIX, atomic_write_json, read_regular_file
from ..base import EMBEDDED_BASE, base_info, load_config
from ..errors import (
    AdapterNotFound,
    DamagedAdapter,
    IntegrityError,
    InvalidName,
    InvalidReference,
    StoreExists,
    VersionNotFound,
)
from ..interactions import Interaction
from ..peft_format import (ADAPTER_WEIGHTS, LoraSettings, check_lora_fits, init_lora_tensors, linear_shapes, lora_shapes,
                           peft_adapter_config, resolve_targets)
from ..refs import CURRENT, KINDS, RESERVED_NAMES, AdapterRef, StackPart, format_version, parse_ref, validate_alias
from . import integrity, materialized, publish, queues
from . import memory as memory_store
from . import lineage as lineage_rules
from .integrity import VerifyReport
from .layout import META, REFS, STORE_FILE, STORE_FORMAT, Layout, now
from .lineage import Dependent
from .materialized import Build, MaterializedFolder
from .memory import AdapterMemory
from .publish import NewVersion
from .queues import PENDING, REPLAY, PendingBatch, PendingFingerprint, ReplayBuffer
from .records import AdapterInfo, LoadedAdapter, Problem, VersionInfo, parse_meta
from .tokens import TokenStore


class Store(Layout):
    """A directory of versioned adapters bound to one base model.

    >>> store = Store.init("adapters", base="smollm2-135m-instruct")   # doctest: +SKIP
    >>> store.create("user:alice").label                               # doctest: +SKIP
    'v0001'
    """

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
            {"format": STORE_FORMAT, "base": {"id": info.id, "fingerprint": info.fingerprint}, "created": now()},
        )
        return store

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Store":
        """Open an initialised store; raise :class:`StoreNotInitialized` if there is none."""
        store = cls(root)
        store.config  # noqa: B018 - validates persona.json
        return store

    # ----------------------------------------------------------------- reading
    def exists(self, ref: str | AdapterRef) -> bool:
        """Whether the adapter has been created (and not deleted)."""
        return (self._adapter_dir(ref) / REFS).is_file()

    def _require(self, ref: AdapterRef) -> Path:
        self.config  # noqa: B018
        path = self._adapter_dir(ref)
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
            return self._read_refs(self._adapter_dir(ref))
        except DamagedAdapter:
            return {}

    def version_numbers(self, ref: str | AdapterRef) -> list[int]:
        """The published version numbers of an adapter, oldest first."""
        return self._version_numbers_in(self._require(parse_ref(ref)))

    def aliases(self, ref: str | AdapterRef) -> dict[str, int]:
        """An adapter's aliases (``current``, ``candidate``, ...) and the versions they name."""
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

    def pin_stack(self, model: str) -> tuple[StackPart, ...]:
        """Pin ``user:carol+domain:b*0.5`` as the engine serves it: versions, layers (see :func:`~persona.store.lineage.pin_stack`)."""
        return lineage_rules.pin_stack(self, model)

    def _read_meta(self, ref: AdapterRef, version: int, aliases: Mapping[str, int] | None = None) -> VersionInfo:
        """The strictly parsed ``meta.json`` of a version (see :mod:`persona.store.records`); :class:`DamagedAdapter` if bad."""
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
        """The record of one version (an alias or none: ``current``)."""
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
        imported: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        """Create an adapter and publish its first version: v0001 (or, for a name deleted before, the number
        after the deleted adapter's last version, so that no version label ever names two sets of weights).

        By default the weights are a fresh LoRA for the store's base (B = 0, so the base's outputs
        are unchanged); ``tensors`` + ``adapter_config`` start it from given weights instead, and
        ``source`` (``--from``) from a copy of another adapter's version, recorded in the lineage.
        ``over`` layers the new adapter on a domain (or merged) adapter pinned at its version now:
        updates train only the new adapter, inference applies both. Given weights are checked against
        the base before anything is written (:func:`~persona.peft_format.check_lora_fits`:
        :class:`IncompatibleAdapter` for a wrong shape or a module the base lacks). ``imported`` records
        where weights brought in by ``persona import`` came from.

        >>> store.create("user:alice", over="domain:finance")    # doctest: +SKIP
        """
        ref = parse_ref(ref)
        if ref.version is not None or ref.alias is not None:
            raise InvalidReference(f"create takes an adapter without a version: {ref.id}, not {ref}")
        if ref.name in RESERVED_NAMES:
            raise InvalidName(f"{ref.name!r} is a reserved name ({ref.kind}:{ref.name} has a special meaning)")
        over_meta = lineage_rules.layer_target(self, ref, over) if over is not None else None
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
        if tensors is None:
            config = load_config(self.config.base_id)
            targets = resolve_targets(settings, config.model_type)
            settings = replace(settings, target_modules=targets)  # record what was resolved
            tensors = init_lora_tensors(lora_shapes(config, targets), settings)
            adapter_config = peft_adapter_config(settings, targets, self.config.base_id)
        elif adapter_config is None:
            raise InvalidReference("create(tensors=...) needs the matching adapter_config")
        else:  # weights from outside: a wrong shape would otherwise fail only when loaded
            check_lora_fits(tensors, adapter_config, self._base_linear_shapes, ref.id)
        lineage_rules.check_shared_lineage(self, ref, lineage, over_meta)
        new = NewVersion(tensors, adapter_config, lineage=lineage, settings=settings, over=over_meta, imported=imported)
        info = publish.publish_first(self, ref, new, [parse_ref(r) for r in (source, over) if r is not None])
        return replace(info, aliases=(CURRENT,))

    def publish_version(self, ref: str | AdapterRef, new: NewVersion, *, set_alias: str | None = CURRENT) -> VersionInfo:
        """Publish the next version of an existing adapter and (optionally) point an alias at it.

        The version number is allocated under the adapter's lock, so concurrent publishers get
        unique, increasing numbers (see :class:`~persona.store.publish.NewVersion` for what a version holds).

        >>> store.publish_version("user:alice", NewVersion(tensors, config, parent=1))   # doctest: +SKIP
        """
        return publish.publish_version(self, parse_ref(ref), new, set_alias)

    def set_alias(self, ref: str | AdapterRef, alias: str, version: int | str) -> None:
        """Point ``alias`` of an adapter at an existing version (atomic)."""
        from ..refs import parse_version

        ref = parse_ref(ref)
        validate_alias(alias)
        number = parse_version(version)
        with self.lock(ref):
            publish.point_alias(self, ref, self._require(ref), alias, number)

    def remove_alias(self, ref: str | AdapterRef, alias: str) -> None:
        """Remove an alias other than ``current``."""
        ref = parse_ref(ref)
        if alias == CURRENT:
            raise InvalidName("the current alias cannot be removed; use rollback to move it")
        with self.lock(ref):
            publish.drop_alias(self, ref, self._require(ref), alias)

    def rollback(self, ref: str | AdapterRef, version: int | str) -> None:
        """Move ``current`` to an earlier (or any existing) version."""
        self.set_alias(ref, CURRENT, version)

    def delete(self, ref: str | AdapterRef, *, cascade: bool = False) -> tuple[str, ...]:
        """Purge every file of an adapter: versions, refs, replay buffer, pending interactions, its tokens,
        and the cached merges built from it.

        An adapter others depend on (merged from it, started from it, layered on it; see
        :meth:`dependents`) is refused with :class:`AdapterHasDependents` listing them, unless
        ``cascade=True``, which deletes them too, most derived first. Returns the adapters deleted.
        """
        ref = parse_ref(ref)
        if ref.version is not None or ref.alias is not None:
            raise InvalidReference(f"delete removes a whole adapter: pass {ref.id}, not {ref}")
        return lineage_rules.delete(self, ref, cascade=cascade)

    def dependents(self, ref: str | AdapterRef) -> list[Dependent]:
        """Adapters that depend on ``ref`` (merged from, started from, layered on it), most derived first."""
        return lineage_rules.dependents(self, ref)

    # ----------------------------------------------------------------- integrity
    def verify(self, ref: str | AdapterRef | None = None) -> VerifyReport:
        """Re-hash every file of every version (of one adapter, or all) and report every problem found."""
        return integrity.verify(self, ref)

    def load(self, ref: str | AdapterRef, *, base_fingerprint: str | None = None) -> LoadedAdapter:
        """Read one version's tensors, refusing tampered files, another base, and pickle files."""
        return integrity.load(self, ref, base_fingerprint=base_fingerprint)

    def version_folder(self, ref: str | AdapterRef) -> Path:
        """A version's folder, its files re-hashed first: for handing to a loader that reads it (vLLM)."""
        return integrity.checked_folder(self, ref)

    def materialized(self, key: str, sources: Sequence[AdapterRef], build: Build) -> MaterializedFolder:
        """The cached plain adapter ``key`` (a sha256 of its inputs), built by ``build()`` from ``sources``
        when absent or damaged (see :mod:`persona.store.materialized`)."""
        return materialized.get_or_build(self, key, sources, build)

    def load_extra(self, ref: str | AdapterRef, name: str) -> dict[str, Any] | None:
        """Read side file ``name`` (``fisher``: ``fisher.train``, or ``fisher.safetensors`` in a version
        written before issue 13) stored beside a version (None when absent), hash-checked."""
        return integrity.load_extra(self, ref, name)

    def heldout(self, ref: str | AdapterRef) -> list[Interaction] | None:
        """The held-out slice a version's update was judged on (``heldout.train``; None: not kept), hash-checked."""
        return integrity.load_heldout(self, ref)

    # ----------------------------------------------------------------- queues, tokens, domains, caches
    def replay(self, ref: str | AdapterRef) -> ReplayBuffer:
        """An adapter's replay buffer (empty when it has none)."""
        return ReplayBuffer.read(self._adapter_dir(ref))

    def replay_digest(self, ref: str | AdapterRef) -> str:
        """sha256 of the replay buffer's file (of no bytes when there is none): changes whenever it does."""
        try:
            raw = read_regular_file(self._adapter_dir(ref) / REPLAY)
        except FileNotFoundError:
            raw = b""
        return hashlib.sha256(raw).hexdigest()

    def write_replay(self, ref: str | AdapterRef, buffer: ReplayBuffer) -> None:
        """Replace an adapter's replay buffer (atomic, mode 0600), under its write lock."""
        with self.lock(ref):
            buffer.write(self._adapter_dir(ref))

    def log(self, ref: str | AdapterRef, interactions: Sequence[Interaction]) -> int:
        """Append validated interactions to an adapter's pending queue and, for a user adapter, to its
        memory (searchable at once, :meth:`memory`); returns how many.

        >>> store.log("user:alice", [Interaction(text="hi")])   # doctest: +SKIP
        1
        """
        ref = parse_ref(ref).unpinned()
        self.show(ref)  # AdapterNotFound when missing
        rows = list(interactions)
        with self.lock(ref):
            count = queues.append(self._adapter_dir(ref), rows)
            if ref.kind == "user":  # only a user's own memory (see persona.store.memory)
                memory_store.append(self._adapter_dir(ref), rows)
            return count

    def memory(self, ref: str | AdapterRef) -> AdapterMemory:
        """An adapter's retrieval memory: entries, search, snapshot, forget (see :mod:`persona.store.memory`).

        >>> store.memory("user:alice").search("cat's name", k=2)   # doctest: +SKIP
        """
        ref = parse_ref(ref).unpinned()
        self._require(ref)
        return AdapterMemory(self, ref)

    def take_pending(self, ref: str | AdapterRef) -> PendingBatch:
        """The pending queue to train on, after dropping rows a published version already consumed."""
        return queues.take(self, parse_ref(ref).unpinned())

    def consume_pending(self, ref: str | AdapterRef, batch: PendingBatch, version: int) -> bool:
        """Remove ``batch`` from the head of the queue now that ``version`` (trained on it) is published."""
        return queues.consume(self, parse_ref(ref).unpinned(), batch, version)

    def pending_counts(self) -> dict[str, int]:
        """``{adapter id: pending rows}`` of every adapter with rows queued (no meta.json read; see
        :func:`~persona.store.queues.pending_counts`).

        >>> store.pending_counts()   # doctest: +SKIP
        {'user:alice': 2}
        """
        return queues.pending_counts(self)

    def pending_fingerprint(self, ref: str | AdapterRef) -> PendingFingerprint:
        """An adapter's pending queue as rows and a sha256 of its lines, to tell cheaply whether it
        changed (no lock, no parsing; :class:`AdapterNotFound` when the adapter is gone).

        >>> store.pending_fingerprint("user:alice").rows   # doctest: +SKIP
        2
        """
        return queues.fingerprint(self._require(parse_ref(ref).unpinned()))

    def drop_consumed_pending(self, ref: str | AdapterRef) -> int:
        """Remove rows a published version consumed but a crash left queued; returns how many."""
        return queues.drop_consumed(self, parse_ref(ref))

    @cached_property
    def _base_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (in, out)}`` of the base's linear layers (from its config; cached per Store)."""
        return linear_shapes(load_config(self.config.base_id))

    @cached_property
    def tokens(self) -> TokenStore:
        """The API tokens of this store."""
        return TokenStore(self)

    def domains(self) -> dict[str, int]:
        """``{name: current version}`` of every domain adapter (stray and half-written folders skipped)."""
        folder = self.root / "domain"
        found: dict[str, int] = {}
        if not folder.is_dir():
            return found
        for child in folder.iterdir():
            if child.name.startswith(TMP_PREFIX) or child.name in RESERVED_NAMES or not (child / REFS).is_file():
                continue
            try:
                found[child.name] = self.resolve(AdapterRef("domain", child.name)).version
            except (InvalidName, AdapterNotFound, VersionNotFound):
                continue  # a stray folder, or deleted while we looked
        return found

