"""persona: per-user LoRA adapters around one frozen base model.

>>> import persona                                    # doctest: +SKIP
>>> store = persona.Store.init("adapters")            # binds the store to the embedded base
>>> store.create("user:alice")                        # publishes user:alice@v1
>>> store.load("user:alice").tensors                  # hash-checked safetensors
>>> trainer = persona.Trainer(store)                  # loads the frozen base once
>>> trainer.update("user:alice", persona.read_interactions("alice.jsonl"))
"""

from .base import EMBEDDED_BASE, BaseInfo, BaseModel, base_info, load_base
from .errors import (
    AdapterExists,
    AdapterNotFound,
    BaseMismatch,
    BaseModelUnavailable,
    DamagedAdapter,
    StoreDamaged,
    IntegrityError,
    InvalidConfig,
    InvalidInteractions,
    InvalidName,
    InvalidReference,
    LockTimeout,
    NonFiniteWeights,
    PersonaError,
    StoreExists,
    StoreNotInitialized,
    UnsafeWeightFile,
    VersionNotFound,
)
from .interactions import Interaction, data_digest, parse_interactions, read_interactions
from .lora_runtime import Activation, AdapterWeights, LoraRuntime
from .peft_format import LoraSettings
from .refs import AdapterRef, StackPart, format_stack, parse_ref, parse_stack
from .compose.merge import METHODS as MERGE_METHODS, merge
from .serving.engine import Engine
from .serving.requests import EngineStats, GenerationRequest, GenerationResult, Handle
from .serving.scheduler import EngineClosed
from .serving.constrain import ResponseFormat
from .serving.sampling import SamplingParams, TokenLogprob, TopLogprob
from .compose.route import RouteChoice, RouteScore, Router
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
from .training.trainer import EvalResult, Trainer, UpdateConfig, UpdateResult, log_interactions

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_BASE",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "GenerationRequest",
    "GenerationResult",
    "Handle",
    "SamplingParams",
    "ResponseFormat",
    "TokenLogprob",
    "TopLogprob",
    "MERGE_METHODS",
    "AdapterHasDependents",
    "Dependent",
    "RouteChoice",
    "RouteScore",
    "Router",
    "merge",
    "Activation",
    "AdapterWeights",
    "EvalResult",
    "Interaction",
    "LoraRuntime",
    "Trainer",
    "UpdateConfig",
    "UpdateResult",
    "data_digest",
    "log_interactions",
    "parse_interactions",
    "read_interactions",
    "AdapterExists",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterRef",
    "BaseInfo",
    "BaseMismatch",
    "BaseModel",
    "BaseModelUnavailable",
    "DamagedAdapter",
    "StoreDamaged",
    "IntegrityError",
    "InvalidConfig",
    "InvalidInteractions",
    "InvalidName",
    "InvalidReference",
    "LoadedAdapter",
    "LockTimeout",
    "LoraSettings",
    "NonFiniteWeights",
    "PersonaError",
    "Problem",
    "StackPart",
    "Store",
    "StoreConfig",
    "StoreExists",
    "StoreNotInitialized",
    "UnsafeWeightFile",
    "VerifyReport",
    "VersionInfo",
    "VersionNotFound",
    "base_info",
    "format_stack",
    "load_base",
    "parse_ref",
    "parse_stack",
]
