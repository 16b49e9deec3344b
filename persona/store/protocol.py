"""What the store's job modules need of the :class:`~persona.store.Store` facade, as a typing Protocol.

``integrity``, ``lineage``, ``memory``, ``publish``, ``queues`` and ``tokens`` do the facade's jobs:
it calls them with itself. Naming the facade's ``Store`` in their type hints would import the facade
module back from the modules it imports (a cycle, even if only under ``TYPE_CHECKING``), so they
name :class:`StoreView` instead: the members they use, and nothing else. ``Store`` satisfies it
structurally; ``tests/test_import_rule.py`` checks that every member here is one of ``Store``'s with
the same parameters, and that no module of the package imports the facade back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from ..refs import AdapterRef
from .layout import StoreConfig
from .records import AdapterInfo, VersionInfo


class TokenRevoker(Protocol):
    """The part of :class:`~persona.store.tokens.TokenStore` a cascading delete uses."""

    def revoke_subject(self, subject: str) -> int: ...


class StoreView(Protocol):
    """The members of ``Store`` that its job modules use (paths, locks, reads of refs and meta.json)."""

    root: Path

    @property
    def config(self) -> StoreConfig: ...

    @property
    def tokens(self) -> TokenRevoker: ...

    # paths and locks (persona.store.layout)
    def _adapter_dir(self, ref: str | AdapterRef) -> Path: ...

    def _version_dir(self, ref: AdapterRef, version: int) -> Path: ...

    def _symlinked(self, ref: AdapterRef) -> Path | None: ...

    def _first_version(self, ref: AdapterRef) -> int: ...

    def _retire(self, doomed: Sequence[tuple[AdapterRef, Sequence[int]]]) -> None: ...

    def _file_lock(self, name: str, held: str) -> AbstractContextManager[None]: ...

    def lock(self, ref: str | AdapterRef, purpose: str = "write") -> AbstractContextManager[None]: ...

    def lineage_lock(self) -> AbstractContextManager[None]: ...

    def cache_dir(self, name: str) -> Path: ...

    # reads (persona.store.facade)
    def exists(self, ref: str | AdapterRef) -> bool: ...

    def _require(self, ref: AdapterRef) -> Path: ...

    def _read_refs(self, path: Path) -> dict[str, int]: ...

    def _alias_names(self, ref: AdapterRef) -> dict[str, int]: ...

    def _read_meta(self, ref: AdapterRef, version: int, aliases: Mapping[str, int] | None = None) -> VersionInfo: ...

    def version_numbers(self, ref: str | AdapterRef) -> list[int]: ...

    def version_info(self, ref: str | AdapterRef) -> VersionInfo: ...

    def resolve(self, ref: str | AdapterRef) -> AdapterRef: ...

    def show(self, ref: str | AdapterRef) -> AdapterInfo: ...

    def list(self, kind: str | None = None) -> list[AdapterInfo]: ...
