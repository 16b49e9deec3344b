"""The store: the only code that opens files under a store root (docs/STORE.md).

``Store`` (the facade in :mod:`persona.store.facade`) is how everyone else reads and writes
adapters, versions, aliases, the replay buffer, the pending queue and the API tokens. Its jobs live
in one module each: layout (paths, locks), records, publish, integrity, lineage, queues, tokens;
``protocol.StoreView`` is what they need of the facade, so none imports it back.
"""

from .facade import Store
from .integrity import VerifyReport
from .layout import REFS, StoreConfig, default_root
from .lineage import AdapterHasDependents, Dependent
from .publish import NewVersion
from .queues import PendingBatch, PendingFingerprint, ReplayBuffer
from .records import AdapterInfo, LoadedAdapter, Problem, VersionInfo
from .tokens import TokenStore

__all__ = ["REFS", "AdapterHasDependents", "AdapterInfo", "Dependent", "LoadedAdapter", "NewVersion", "PendingBatch",
           "PendingFingerprint", "Problem", "ReplayBuffer", "Store", "StoreConfig", "TokenStore", "VerifyReport",
           "VersionInfo", "default_root"]
