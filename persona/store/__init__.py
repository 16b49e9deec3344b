"""The store: the only code that opens files under a store root (docs/STORE.md).

``Store`` (the facade in :mod:`persona.store.facade`) is how everyone else reads and writes
adapters, versions, aliases, the replay buffer, the pending queue and the API tokens.
"""

from .facade import (
    REFS,
    AdapterHasDependents,
    AdapterInfo,
    Dependent,
    LoadedAdapter,
    Problem,
    Store,
    StoreConfig,
    VerifyReport,
    VersionInfo,
    default_root,
)

__all__ = ["REFS", "AdapterHasDependents", "AdapterInfo", "Dependent", "LoadedAdapter", "Problem", "Store",
           "StoreConfig", "VerifyReport", "VersionInfo", "default_root"]
