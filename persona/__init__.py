"""persona: per-user LoRA adapters around one frozen base model.

>>> import persona                                    # doctest: +SKIP
>>> store = persona.Store.init("adapters")            # binds the store to the embedded base
>>> store.create("user:alice")                        # publishes user:alice@v1
>>> store.load("user:alice").tensors                  # hash-checked safetensors
>>> trainer = persona.Trainer(store)                  # loads the frozen base once
>>> trainer.update("user:alice", persona.read_interactions("alice.jsonl"))

The public names below are loaded on first use (huggingface_hub's lazy ``__init__`` is the model):
``import persona`` and the ``persona`` command's ``--help``/``--version`` do not import torch, and
``persona.Engine`` imports the serving stack only when it is touched (issue 12, item 7).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# submodule (relative to this package) -> the public names it provides, grouped by subpackage
_SUBMOD_ATTRS: dict[str, list[str]] = {
    # core
    "base": ["EMBEDDED_BASE", "BaseInfo", "BaseModel", "base_info", "load_base", "resolve_device"],
    "errors": [
        "AdapterExists",
        "AdapterNotFound",
        "AdapterSourceNotFound",
        "IncompatibleAdapter",
        "BaseMismatch",
        "BaseModelUnavailable",
        "DamagedAdapter",
        "DeviceUnavailable",
        "ExportTargetExists",
        "IntegrityError",
        "InvalidConfig",
        "InvalidInteractions",
        "InvalidName",
        "InvalidReference",
        "LockTimeout",
        "NonFiniteWeights",
        "EngineClosed",
        "PersonaError",
        "StoreDamaged",
        "StoreExists",
        "StoreNotInitialized",
        "UnsafeWeightFile",
        "VersionNotFound",
    ],
    "interactions": ["Interaction", "data_digest", "parse_interactions", "read_interactions"],
    "lora_runtime": ["Activation", "AdapterWeights", "LoraRuntime"],
    "peft_format": ["LoraSettings"],
    "refs": ["AdapterRef", "StackPart", "format_stack", "parse_ref", "parse_stack"],
    # store/
    "store": [
        "AdapterHasDependents",
        "AdapterInfo",
        "Dependent",
        "LoadedAdapter",
        "Problem",
        "Store",
        "StoreConfig",
        "VerifyReport",
        "VersionInfo",
    ],
    # training/
    "training.bulk": ["UpdateFailure"],
    "training.config": ["BulkConfig", "UpdateConfig"],
    "training.matrix": ["LossMatrix"],
    "training.trainer": ["EvalResult", "Trainer", "UpdateResult", "log_interactions"],
    # serving/
    "serving.engine": ["Engine"],
    "serving.requests": ["EngineStats", "GenerationRequest", "GenerationResult", "Handle"],
    "serving.constrain": ["ResponseFormat"],
    "serving.sampling": ["SamplingParams", "TokenLogprob", "TopLogprob"],
    # compose/
    "compose.merge": ["merge"],
    "compose.peft_import": ["import_adapter"],
    "compose.materialize": ["Materialized", "materialize"],
    "compose.export": ["ExportResult", "export_adapter"],
    "compose.route": ["RouteChoice", "RouteScore", "Router"],
}
_RENAMED = {"MERGE_METHODS": ("compose.merge", "METHODS")}  # public name -> (submodule, its name there)

_NAME_TO_SOURCE: dict[str, tuple[str, str]] = {
    **{name: (module, name) for module, names in _SUBMOD_ATTRS.items() for name in names},
    **_RENAMED,
}

__all__ = [
    "Activation",
    "AdapterExists",
    "AdapterHasDependents",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterRef",
    "AdapterSourceNotFound",
    "AdapterWeights",
    "BaseInfo",
    "BaseMismatch",
    "BaseModel",
    "BaseModelUnavailable",
    "BulkConfig",
    "DamagedAdapter",
    "Dependent",
    "DeviceUnavailable",
    "EMBEDDED_BASE",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "EvalResult",
    "ExportResult",
    "ExportTargetExists",
    "GenerationRequest",
    "GenerationResult",
    "Handle",
    "IncompatibleAdapter",
    "IntegrityError",
    "Interaction",
    "InvalidConfig",
    "InvalidInteractions",
    "InvalidName",
    "InvalidReference",
    "LoadedAdapter",
    "LockTimeout",
    "LossMatrix",
    "LoraRuntime",
    "LoraSettings",
    "MERGE_METHODS",
    "Materialized",
    "NonFiniteWeights",
    "PersonaError",
    "Problem",
    "ResponseFormat",
    "RouteChoice",
    "RouteScore",
    "Router",
    "SamplingParams",
    "StackPart",
    "Store",
    "StoreConfig",
    "StoreDamaged",
    "StoreExists",
    "StoreNotInitialized",
    "TokenLogprob",
    "TopLogprob",
    "Trainer",
    "UnsafeWeightFile",
    "UpdateConfig",
    "UpdateFailure",
    "UpdateResult",
    "VerifyReport",
    "VersionInfo",
    "VersionNotFound",
    "base_info",
    "data_digest",
    "export_adapter",
    "format_stack",
    "import_adapter",
    "load_base",
    "log_interactions",
    "materialize",
    "merge",
    "parse_interactions",
    "parse_ref",
    "parse_stack",
    "read_interactions",
    "resolve_device",
]
"""Every public name; tests/test_lazy_import.py checks it lists exactly the names above."""


def __getattr__(name: str) -> Any:
    """Import the submodule that provides ``name`` on first access, and cache the value here."""
    source = _NAME_TO_SOURCE.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = source
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these on demand
    from .base import EMBEDDED_BASE, BaseInfo, BaseModel, base_info, load_base, resolve_device
    from .compose.export import ExportResult, export_adapter
    from .compose.materialize import Materialized, materialize
    from .compose.merge import METHODS as MERGE_METHODS, merge
    from .compose.peft_import import import_adapter
    from .compose.route import RouteChoice, RouteScore, Router
    from .errors import (
        AdapterExists,
        AdapterNotFound,
        AdapterSourceNotFound,
        BaseMismatch,
        BaseModelUnavailable,
        DamagedAdapter,
        DeviceUnavailable,
        EngineClosed,
        ExportTargetExists,
        IncompatibleAdapter,
        IntegrityError,
        InvalidConfig,
        InvalidInteractions,
        InvalidName,
        InvalidReference,
        LockTimeout,
        NonFiniteWeights,
        PersonaError,
        StoreDamaged,
        StoreExists,
        StoreNotInitialized,
        UnsafeWeightFile,
        VersionNotFound,
    )
    from .interactions import Interaction, data_digest, parse_interactions, read_interactions
    from .lora_runtime import Activation, AdapterWeights, LoraRuntime
    from .peft_format import LoraSettings
    from .refs import AdapterRef, StackPart, format_stack, parse_ref, parse_stack
    from .serving.constrain import ResponseFormat
    from .serving.engine import Engine
    from .serving.requests import EngineStats, GenerationRequest, GenerationResult, Handle
    from .serving.sampling import SamplingParams, TokenLogprob, TopLogprob
    from .store import (
        AdapterHasDependents,
        AdapterInfo,
        Dependent,
        LoadedAdapter,
        Problem,
        Store,
        StoreConfig,
        VerifyReport,
        VersionInfo,
    )
    from .training.bulk import UpdateFailure
    from .training.config import BulkConfig, UpdateConfig
    from .training.matrix import LossMatrix
    from .training.trainer import EvalResult, Trainer, UpdateResult, log_interactions
