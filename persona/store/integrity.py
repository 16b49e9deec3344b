"""Content-addressed integrity: re-hash what was published (``verify``) and read a version's bytes only
after checking them against its ``meta.json`` (``load``, ``load_extra``): what is checked is what is used.

A version refuses to load when a file changed after publish, it names a file outside its folder, it
was made on another base, or its folder holds a pickle-format weight file (persona reads safetensors only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import read_regular_file, sha256_file, symlinks_under
from ..base import PICKLE_SUFFIXES
from ..errors import BaseMismatch, DamagedAdapter, IntegrityError, InvalidName, UnsafeWeightFile
from ..interactions import Interaction, parse_interactions
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..refs import KINDS, AdapterRef, format_version, parse_ref
from .layout import META, REFS
from .lineage import user_ancestry
from .memory import MEMORY, problems as memory_problems
from .records import HELDOUT_FILE, HELDOUT_NAME, SIDE_SUFFIX, LoadedAdapter, Problem, side_file_names

if TYPE_CHECKING:
    from .protocol import StoreView


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


def _version_problems(store: StoreView, ref: AdapterRef, version: int) -> tuple[list[Problem], int]:
    try:
        info = store._read_meta(ref, version)  # strict: also checks the version is where it claims
    except DamagedAdapter as exc:
        return [Problem(ref.id, version, META, exc.reason)], 0
    folder = store._version_dir(ref, version)
    problems: list[Problem] = []
    fp, ours = info.base_fingerprint, store.config.base_fingerprint
    if fp != ours:
        problems.append(Problem(ref.id, version, META, f"bound to another base ({fp[:19]}), store base is {ours[:19]}"))
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
        path = user_ancestry(store, info.sources())
        if path:
            problems.append(Problem(ref.id, version, META,
                                    f"a shared domain adapter descends from a user adapter: {' <- '.join(path)}"))
    return problems, len(info.files)


def verify(store: StoreView, ref: str | AdapterRef | None = None) -> VerifyReport:
    """Re-hash every file of every version (of one adapter, or all) and report each mismatch,
    damaged metadata, version in the wrong folder, symlink, domain adapter descending from a user,
    and damaged memory file (:mod:`persona.store.memory`)."""
    problems: list[Problem] = []
    if ref is None:
        # a symlinked adapter folder is reported by the symlink scan below, its target never read
        adapters = [r for a in store.list() if store._symlinked(r := AdapterRef(a.kind, a.name)) is None]
        scan = store.root
    else:
        parsed = parse_ref(ref)
        store._require(parsed)
        adapters = [parsed.unpinned()]
        scan = store._adapter_dir(parsed)
    for link in symlinks_under(scan):
        where = link.parts
        owner = f"{where[0]}:{where[1]}" if scan == store.root and len(where) >= 2 and where[0] in KINDS else (
            parse_ref(ref).unpinned().id if ref is not None else "store")
        problems.append(Problem(owner, None, str(link), "symlink (the store refuses symlinks under its root; remove it)"))
    n_versions = n_files = 0
    for adapter in adapters:
        numbers = store.version_numbers(adapter)
        pinned = ref is not None and (parse_ref(ref).version or parse_ref(ref).alias)
        for version in [store.resolve(ref).version] if pinned else numbers:
            found, files = _version_problems(store, adapter, version)
            problems += found
            n_versions += 1
            n_files += files
        problems += _memory_problems(store, adapter)
        try:
            aliases = store._read_refs(store._adapter_dir(adapter))
        except DamagedAdapter as exc:
            problems.append(Problem(adapter.id, None, REFS, exc.reason))
            continue
        for alias, version in aliases.items():
            if version not in numbers:
                problems.append(Problem(adapter.id, None, REFS,
                                        f"alias {alias!r} points at missing version {format_version(version)}"))
    return VerifyReport(len(adapters), n_versions, n_files, tuple(problems))


def _memory_problems(store: StoreView, adapter: AdapterRef) -> list[Problem]:
    """What is wrong with an adapter's memory file (unreadable lines, a torn tail, wider than 0600)."""
    try:
        found = memory_problems(store._adapter_dir(adapter))
    except IntegrityError as exc:  # a symlink is also in the store-wide scan; a FIFO or device only here
        found = [str(exc).replace(str(store._adapter_dir(adapter) / MEMORY), "it")]
    return [Problem(adapter.id, None, MEMORY, reason) for reason in found]


def load(store: StoreView, ref: str | AdapterRef, *, base_fingerprint: str | None = None) -> LoadedAdapter:
    """Read one version's tensors, refusing tampered files, another base, and pickle files.

    Each file is read once into memory, hashed, and parsed from those same bytes, so what is
    checked is what is used.
    """
    from safetensors.torch import load as load_safetensors

    pinned = store.resolve(ref)
    folder = store._version_dir(pinned, pinned.version)  # DamagedAdapter for a symlinked version
    pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UnsafeWeightFile(
            f"{pinned}: refusing to load: {', '.join(pickles)} is a pickle-format file; persona reads "
            "safetensors only. Remove the file (`persona verify` lists such files)"
        )
    info = store._read_meta(pinned, pinned.version, store._alias_names(pinned))
    expected = base_fingerprint or store.config.base_fingerprint
    if info.base_fingerprint != expected:
        raise BaseMismatch(
            f"{pinned} was made on another base ({info.base_fingerprint[:19]}) than this one ({expected[:19]}); "
            "an adapter only works on the base it was trained on"
        )
    blobs: dict[str, bytes] = {}
    for name, digest in info.files.items():
        if not name.endswith((".json", ".safetensors", SIDE_SUFFIX)):
            raise UnsafeWeightFile(f"{pinned}: {name} is not a JSON or safetensors file")
        data = _read_version_file(pinned, folder, name)
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(
                f"{pinned}: {name} does not match the sha256 recorded at publish time; it was modified or "
                "corrupted. Run `persona verify` and roll back to a good version"
            )
        blobs[name] = data
    config = json.loads(blobs[ADAPTER_CONFIG])
    tensors = load_safetensors(blobs[ADAPTER_WEIGHTS])
    return LoadedAdapter(info=info, config=config, tensors=tensors)


def _read_version_file(pinned: AdapterRef, folder: Path, name: str) -> bytes:
    """A file named in a version's meta.json: only inside that folder (containment), never a symlink."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve() or path.name != name:
        raise DamagedAdapter(f"{pinned}: meta.json names {name!r}, which is not a file of the version folder",
                             reason=f"names {name!r}, outside the version folder")
    try:
        return read_regular_file(folder / name)
    except FileNotFoundError:
        raise IntegrityError(f"{pinned}: {name} is missing; run `persona verify` and roll back to a good version") from None


def load_extra(store: StoreView, ref: str | AdapterRef, name: str) -> dict[str, Any] | None:
    """Read side file ``name`` (``fisher``) stored beside a version (None when absent), hash-checked.

    Reads ``NAME.train``, or ``NAME.safetensors`` in a version written before issue 13.
    """
    from safetensors.torch import load as load_safetensors

    if name == HELDOUT_NAME:
        raise InvalidName("the held-out slice is JSON Lines, not tensors: read it with Store.heldout(ref)")
    info = store.version_info(ref)
    name = next((n for n in side_file_names(name) if n in info.files), None)
    if name is None:
        return None
    data = _read_version_file(info.ref, store._version_dir(info.ref, info.version), name)
    if hashlib.sha256(data).hexdigest() != info.files[name]:
        raise IntegrityError(f"{info.ref}: {name} does not match its recorded sha256")
    return load_safetensors(data)


def load_heldout(store: StoreView, ref: str | AdapterRef) -> list[Interaction] | None:
    """The held-out slice a version's update was judged on (None: not kept), hash-checked before it is parsed."""
    info = store.version_info(ref)
    if not info.heldout_kept:
        return None
    data = _read_version_file(info.ref, store._version_dir(info.ref, info.version), HELDOUT_FILE)
    if hashlib.sha256(data).hexdigest() != info.files[HELDOUT_FILE]:
        raise IntegrityError(f"{info.ref}: {HELDOUT_FILE} does not match its recorded sha256; run `persona verify`")
    return parse_interactions(data.decode("utf-8").split("\n"), source=f"{info.ref}:{HELDOUT_FILE}")


def checked_folder(store: StoreView, ref: str | AdapterRef) -> Path:
    """The folder of one version after re-hashing every file in it, for a loader that reads the folder
    itself (vLLM): :class:`BaseMismatch` for another base, :class:`IntegrityError` for anything
    ``verify`` would report (a changed, missing, unexpected or pickle file, a symlink)."""
    pinned = store.resolve(ref)
    info = store._read_meta(pinned, pinned.version)
    if info.base_fingerprint != store.config.base_fingerprint:
        raise BaseMismatch(f"{pinned} was made on another base ({info.base_fingerprint[:19]}) than the store's "
                           f"({store.config.base_fingerprint[:19]})")
    folder = store._version_dir(pinned, pinned.version)
    problems, _ = _version_problems(store, pinned.unpinned(), pinned.version)
    problems += [Problem(pinned.id, pinned.version, str(link), "symlink") for link in symlinks_under(folder)]
    if problems:
        raise IntegrityError(f"{problems[0]}. Run `persona verify {pinned.id}` and roll back to a good version")
    return folder
