"""Atomic publishing: a new version (or a new adapter with its first version) appears whole or not at
all, and aliases move only to versions that exist.

- Versions are immutable and published whole: files go to a hidden temp dir, are fsynced, and the
  dir is renamed to ``vNNNN`` in one ``os.replace``. A new adapter (its first version and its refs)
  appears the same way, in one rename of its whole folder.
- Aliases move by an atomic rewrite of ``refs.json``, after the version they name exists: refs never
  point at a missing version, whatever instant a crash hits.
- What is published must read back: ``meta.json`` is checked by the same strict parser every reader
  uses, and NaN or infinity in any tensor refuses the publish before a file is written.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .._fs import (PRIVATE_MODE, atomic_write_bytes, atomic_write_json, dumps_json, fsync_dir, fsync_tree,
                   remove_stale, remove_tree, sha256_file, temp_sibling)
from ..errors import (AdapterExists, AdapterNotFound, DamagedAdapter, InvalidName, InvalidReference,
                      NonFiniteWeights, VersionNotFound)
from ..interactions import Interaction
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings
from ..refs import CURRENT, AdapterRef, format_version, validate_alias
from .layout import META, REFS, STORE_FORMAT, now
from .lineage import check_shared_lineage
from .queues import jsonl_bytes
from .records import HELDOUT_FILE, HELDOUT_NAME, VersionInfo, parse_meta, side_file_names

if TYPE_CHECKING:
    from .protocol import StoreView


@dataclass(frozen=True)
class NewVersion:
    """Everything a version to publish holds, besides its adapter and number (allocated at publish).

    ``extra_files`` maps a side-file name (``fisher``) to tensors stored beside the version (an EWC
    Fisher estimate): written as safetensors bytes to ``NAME.train``, a name no ``*.safetensors``
    glob of a PEFT loader picks up (:data:`~persona.store.records.SIDE_SUFFIX`); read them back with
    ``Store.load_extra(ref, NAME)``. ``pending`` records the head of the pending queue the version was
    trained on (``{"rows": N, "digest": ...}``, see :mod:`persona.store.queues`), so a crash before
    the queue is consumed does not train it twice. ``over`` pins the adapter it is layered on
    (None: a layered adapter's next version stays on its parent's layer). ``heldout`` is the slice of
    the update's data its gate evaluated on, kept as ``heldout.train`` (JSON Lines, mode 0600, hashed
    like every file; read back with ``Store.heldout(ref)``) for ``persona eval --matrix``; None or empty
    keeps nothing. ``memory`` records the adapter's memory snapshot the update saw
    (:class:`~persona.store.memory.MemorySnapshot`).

    >>> store.publish_version("user:alice", NewVersion(tensors, config, parent=1))   # doctest: +SKIP
    """

    tensors: Mapping[str, Any]
    adapter_config: Mapping[str, Any]
    parent: int | None = None
    metrics: Mapping[str, Any] | None = None
    training: Mapping[str, Any] | None = None
    data_digest: str | None = None
    lineage: tuple[Mapping[str, Any], ...] = ()
    extra_files: Mapping[str, Mapping[str, Any]] | None = None
    settings: LoraSettings | None = None
    over: Mapping[str, Any] | None = None
    pending: Mapping[str, Any] | None = None
    imported: Mapping[str, Any] | None = None  # where an imported adapter came from (``persona import``)
    heldout: Sequence[Interaction] | None = None
    origin: str | None = None  # what published it, when not a person: "auto-update" (``serve --auto-update``)
    memory: Mapping[str, Any] | None = None  # the memory snapshot an update saw ({"entries", "digest"})


def publish_version(store: StoreView, ref: AdapterRef, new: NewVersion, set_alias: str | None) -> VersionInfo:
    """Publish the next version of an existing adapter under its lock; optionally point an alias at it."""
    ref = ref.unpinned()
    if set_alias is not None:
        validate_alias(set_alias)
    check_shared_lineage(store, ref, new.lineage, new.over, new.parent)
    with store.lock(ref):
        path = store._require(ref)
        remove_stale(path)  # left by a crashed writer; we hold the lock
        numbers = store.version_numbers(ref)
        if new.parent is not None and new.parent not in numbers:
            raise VersionNotFound(f"parent version {format_version(new.parent)} of {ref.id} does not exist")
        version = (numbers[-1] if numbers else 0) + 1
        if new.over is None and new.parent is not None:  # a layered adapter stays on its layer
            new = replace(new, over=store._read_meta(ref, new.parent).over)
        final = path / format_version(version)
        staging = temp_sibling(final)
        try:
            _write_version(store, staging, ref, version, new)
            fsync_tree(staging)
            os.replace(staging, final)
            fsync_dir(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if set_alias is not None:
            point_alias(store, ref, path, set_alias, version)
    return store.version_info(ref.at(version))


def publish_first(store: StoreView, ref: AdapterRef, new: NewVersion, derived: Sequence[AdapterRef]) -> VersionInfo:
    """Create ``ref`` with its first version and ``current`` pointing at it, in one rename of its folder.

    A child of another adapter (``derived``: ``--from``, ``--over``) is published under the lineage
    lock, after checking its parent still exists, so a concurrent delete cannot miss it.
    """
    path = store._adapter_dir(ref)
    with store.lineage_lock() if derived else nullcontext(), store.lock(ref):
        for parent in derived:
            if not store.exists(parent):
                raise AdapterNotFound(f"{parent.id} was deleted while {ref.id} was being created from it")
        if (path / REFS).is_file():
            raise AdapterExists(f"{ref.id} already exists; use `persona update` to train it, or delete it first")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, ref.name)  # a crashed create's or delete's staging
        if path.exists():  # leftovers of a crashed create: never published, safe to clear
            remove_tree(path)
        first = store._first_version(ref)
        staging = temp_sibling(path)
        staging.mkdir()
        try:
            info = _write_version(store, staging / format_version(first), ref, first, new)
            (staging / REFS).write_bytes(dumps_json({"aliases": {CURRENT: first}}))
            fsync_tree(staging)
            os.replace(staging, path)
            fsync_dir(path.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return info


def point_alias(store: StoreView, ref: AdapterRef, path: Path, alias: str, version: int) -> None:
    """Point ``alias`` at an existing ``version`` (atomic rewrite of refs.json; hold the adapter's lock)."""
    if not (path / format_version(version) / META).is_file():
        raise VersionNotFound(f"{ref.id} has no version {format_version(version)}; see `persona show {ref.id}`")
    aliases = store._read_refs(path)
    aliases[alias] = version
    atomic_write_json(path / REFS, {"aliases": aliases})


def drop_alias(store: StoreView, ref: AdapterRef, path: Path, alias: str) -> None:
    """Remove ``alias`` (atomic rewrite of refs.json; hold the adapter's lock)."""
    aliases = store._read_refs(path)
    if aliases.pop(alias, None) is None:
        raise VersionNotFound(f"{ref.id} has no alias {alias!r}")
    atomic_write_json(path / REFS, {"aliases": aliases})


def _write_version(store: StoreView, folder: Path, ref: AdapterRef, version: int, new: NewVersion) -> VersionInfo:
    from safetensors.torch import save_file

    _check_finite(ref, version, new.tensors, new.extra_files)
    side = {side_file_names(name)[0]: extra for name, extra in (new.extra_files or {}).items()}
    if HELDOUT_FILE in side:
        raise InvalidName(f"side file name {HELDOUT_NAME!r} is the held-out slice's; pass it as NewVersion.heldout")
    folder.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in new.tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_bytes(dumps_json(dict(new.adapter_config)))
    for file_name, extra in side.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(folder / file_name),
                  metadata={"format": "pt"})
    if new.heldout:  # a person's interactions: private from the first byte, as the replay buffer is
        atomic_write_bytes(folder / HELDOUT_FILE, jsonl_bytes(new.heldout), PRIVATE_MODE)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    lora = new.settings.to_dict() if new.settings else _settings_from_peft(new.adapter_config)
    meta = {
        "format": STORE_FORMAT,
        "adapter": ref.id,
        "version": version,
        "parent": new.parent,
        "created": now(),
        "base_id": store.config.base_id,
        "base_fingerprint": store.config.base_fingerprint,
        "files": files,
        "lora": lora,
        "metrics": dict(new.metrics or {}),
        "training": dict(new.training) if new.training else None,
        "data_digest": new.data_digest,
        "lineage": list(new.lineage),
        "over": dict(new.over) if new.over else None,
        "pending": dict(new.pending) if new.pending else None,
    }
    if new.imported:  # only on imported versions: an older persona ignores the key (records.py)
        meta["imported"] = dict(new.imported)
    if new.origin:  # only where set, like "imported"; records.py checks the tag
        meta["origin"] = new.origin
    if new.memory:  # only on updates (issue 16); an older persona ignores the key
        meta["memory"] = dict(new.memory)
    raw = dumps_json(meta)
    # What is published must read back: the same strict parser every reader uses checks it now.
    try:
        info = parse_meta(raw, adapter=ref.id, version=version)
    except DamagedAdapter as exc:
        raise InvalidReference(f"refusing to publish {ref.id}@{format_version(version)}: its {exc.reason}") from None
    (folder / META).write_bytes(raw)
    return info


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
