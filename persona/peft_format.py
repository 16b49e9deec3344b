"""PEFT's on-disk adapter format, in one place: ``adapter_config.json`` as a typed frozen
:class:`PeftConfig`, the LoRA tensor key names, the LoRA variants persona refuses, LoRA settings, and
fresh adapter weights.

A new adapter is built from the base's *config* alone: the model is instantiated on the meta device
(no weights read, no memory), the target ``nn.Linear`` modules are found, and A/B tensors are made
with PEFT's initialisation (A: Kaiming-uniform, B: zeros, so a new adapter leaves the base's output
unchanged). The keys and ``adapter_config.json`` are exactly what ``PeftModel.save_pretrained``
writes, so PEFT loads our versions as they are (and a loader that globs ``*.safetensors``, as LoRAX
and TGI do, finds only the adapter: training side files are named ``NAME.train``, see the store). For
other loaders persona also hands out checked paths: ``persona export`` (only the adapter files and a
``base_model_name_or_path`` a loader resolves) and the vLLM resolver (``persona.integrations.vllm``: a
hash-checked folder, or a stack's cat merge). No torch at import time: this is a core module that
``persona list`` imports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, TypeVar

from .errors import InvalidConfig, UnsupportedAdapter, refuse_unknown_keys

_T = TypeVar("_T")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

# The LoRA variants persona neither computes (lora_runtime) nor merges correctly (PEFT merges them
# silently wrong: huggingface/peft#3761), in the order they are checked: config key -> what it is.
UNSUPPORTED_VARIANTS: dict[str, str] = {
    "use_dora": "DoRA",
    "use_rslora": "rsLoRA",
    "lora_bias": "LoRA bias",
    "use_qalora": "QALoRA",
    "rank_pattern": "per-module rank patterns",
    "alpha_pattern": "per-module alpha patterns",
}

# Every linear projection inside a block: attention and MLP (QLoRA's finding that adapting all
# linear layers matters). Architectures not listed fall back to PEFT's own defaults.
_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    t: _ALL_LINEAR for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite")
}


@dataclass(frozen=True)
class LoraSettings:
    """Shape and initialisation of a LoRA adapter.

    >>> LoraSettings(rank=16, alpha=32).scaling
    2.0
    """

    # metadata: help and validated range, from which the CLI builds its options (persona.cli._common)
    rank: int = field(default=8, metadata={
        "help": "LoRA rank r.", "range": {"min": 1, "max": 1024}})
    alpha: float = field(default=16.0, metadata={
        "help": "LoRA alpha (scale = alpha / rank).", "range": {"min": 0, "max": 1e4, "min_open": True}})
    dropout: float = field(default=0.05, metadata={
        "help": "LoRA dropout.", "range": {"min": 0, "max": 1, "max_open": True}})
    target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj,v_proj (comma-separated on the command line). "
                          "Default: every linear layer of each block (the base architecture's default)."},
    )
    init: Literal["default", "random"] = field(
        default="default",
        metadata={"help": "default: B=0, the new adapter leaves the base's output unchanged."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation."})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise InvalidConfig(f"rank must be an integer in 1..1024, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1e4:
            raise InvalidConfig(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise InvalidConfig(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("default", "random"):
            raise InvalidConfig(f"init must be 'default' or 'random', got {self.init!r}")
        if self.target_modules is not None:
            targets = tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t.replace("_", "").replace(".", "").isalnum() for t in targets):
                raise InvalidConfig(f"target_modules must be module names such as q_proj, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraSettings":
        refuse_unknown_keys(cls, data, "LoRA setting")
        data = dict(data)
        if data.get("target_modules") is not None:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)

    @classmethod
    def from_peft(cls, config: "PeftConfig | Mapping[str, Any]") -> "LoraSettings":
        """The settings of an existing adapter, from its ``adapter_config.json``."""
        config = PeftConfig.of(config)
        targets = config.target_modules
        return cls(
            rank=config.r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=tuple(sorted(targets)) if targets else None,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d


def resolve_targets(settings: LoraSettings, model_type: str) -> tuple[str, ...]:
    if settings.target_modules:
        return settings.target_modules
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    if model_type in peft_defaults:
        return tuple(peft_defaults[model_type])
    raise InvalidConfig(f"no default LoRA targets for model type {model_type!r}: pass target_modules (--targets)")


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{module_name: (in_features, out_features)}`` of every linear layer of the base but ``lm_head``
    (the model is built on the meta device from its config: no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }


def lora_shapes(config: Any, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``{module_name: (in_features, out_features)}`` for each targeted linear layer of the base."""
    shapes = {name: io for name, io in linear_shapes(config).items() if name.rsplit(".", 1)[-1] in targets}
    if not shapes:
        raise InvalidConfig(f"none of the target modules {', '.join(targets)} exists in this base model")
    found = {n.rsplit(".", 1)[-1] for n in shapes}
    missing = sorted(set(targets) - found)
    if missing:
        raise InvalidConfig(f"target module(s) {', '.join(missing)} not found in this base model")
    return shapes


def init_lora_tensors(shapes: dict[str, tuple[int, int]], settings: LoraSettings) -> dict[str, Any]:
    """Fresh A/B tensors keyed as PEFT saves them (float32, contiguous)."""
    import torch

    generator = torch.Generator().manual_seed(settings.seed)
    tensors = {}
    for name in sorted(shapes):
        fan_in, fan_out = shapes[name]
        a = torch.empty(settings.rank, fan_in)
        b = torch.empty(fan_out, settings.rank)
        _kaiming_uniform(a, generator)
        if settings.init == "random":
            _kaiming_uniform(b, generator)
        else:
            b.zero_()
        tensors.update(peft_tensors({name: (a, b)}))
    return tensors


def _kaiming_uniform(t, generator) -> None:
    # nn.init.kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use, with our own generator.
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + 5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    t.uniform_(-bound, bound, generator=generator)


def peft_adapter_config(settings: LoraSettings, targets: tuple[str, ...], base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT would write for these settings."""
    return PeftConfig.for_settings(settings, targets, base_model).to_json()


# ------------------------------------------------------------------------------ adapter_config.json


@dataclass(frozen=True)
class PeftConfig:
    """An adapter's ``adapter_config.json``: the fields persona reads, typed, over the whole document.

    ``from_json(d).to_json() == d``: every field PEFT wrote (persona reads a handful of ~50) is kept
    as written, so a stored config is republished byte for byte. Build one with :meth:`from_json`
    (a stored file), :meth:`for_settings` (a new adapter) or :meth:`from_lora_config` (PEFT's own
    object, e.g. a merge's result). A config missing ``r`` or ``lora_alpha`` raises
    :class:`~persona.errors.UnsupportedAdapter`.

    >>> PeftConfig.from_json({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}).scaling
    2.0
    """

    document: Mapping[str, Any] = field(repr=False)
    r: int = field(init=False)
    lora_alpha: float = field(init=False)
    lora_dropout: float = field(init=False)
    target_modules: tuple[str, ...] | None = field(init=False)  # PEFT also allows one name or a regex
    peft_type: str = field(init=False)
    base_model_name_or_path: str | None = field(init=False)

    def __post_init__(self) -> None:
        doc = dict(self.document)
        try:
            r, alpha = int(doc["r"]), float(doc["lora_alpha"])
            dropout = float(doc.get("lora_dropout") or 0.0)
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedAdapter(f"adapter_config.json has no usable r / lora_alpha / lora_dropout ({e!r})") from None
        targets = doc.get("target_modules") or None
        if isinstance(targets, str):
            targets = (targets,)
        set_ = object.__setattr__
        set_(self, "document", MappingProxyType(doc))
        set_(self, "r", r)
        set_(self, "lora_alpha", alpha)
        set_(self, "lora_dropout", dropout)
        set_(self, "target_modules", tuple(targets) if targets else None)
        set_(self, "peft_type", str(doc.get("peft_type", "LORA")))
        set_(self, "base_model_name_or_path", doc.get("base_model_name_or_path"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PeftConfig":
        """The config of a parsed ``adapter_config.json`` object."""
        return cls(data)

    @classmethod
    def of(cls, config: "PeftConfig | Mapping[str, Any]") -> "PeftConfig":
        """``config`` itself, or parsed when given as the JSON mapping (callers may pass either)."""
        return config if isinstance(config, PeftConfig) else cls.from_json(config)

    def to_json(self) -> dict[str, Any]:
        """The JSON object to write: exactly the document this config was made from."""
        return dict(self.document)

    @property
    def scaling(self) -> float:
        """The factor LoRA's update is multiplied by: ``lora_alpha / r``."""
        return self.lora_alpha / self.r

    @property
    def variants(self) -> tuple[str, ...]:
        """The unsupported LoRA variants this config turns on (keys of :data:`UNSUPPORTED_VARIANTS`)."""
        return tuple(key for key in UNSUPPORTED_VARIANTS if self.document.get(key))

    @classmethod
    def for_settings(cls, settings: LoraSettings, targets: tuple[str, ...], base_model: str) -> "PeftConfig":
        """The config PEFT would write for a new adapter with these settings."""
        from peft import LoraConfig

        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
            init_lora_weights=settings.init != "random",
        )
        return cls.from_lora_config(config, base_model)

    @classmethod
    def from_lora_config(cls, config: Any, base_model: str) -> "PeftConfig":
        """PEFT's ``LoraConfig`` as persona writes it: JSON values only, bound to ``base_model``, and
        ``inference_mode`` off (as every stored ``adapter_config.json``)."""
        out = {}
        for key, value in config.to_dict().items():
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, str) and hasattr(value, "value"):  # PEFT's str enums
                value = value.value
            out[key] = value
        out["base_model_name_or_path"] = base_model
        out["inference_mode"] = False
        return cls(out)

    def to_lora_config(self) -> Any:
        """PEFT's ``LoraConfig`` for this config, from the fields this PEFT knows (another version may
        have written more)."""
        from peft import LoraConfig

        known = {f.name for f in fields(LoraConfig)}
        return LoraConfig.from_peft_type(**{k: v for k, v in self.document.items() if k in known})


def refuse_variants(config: PeftConfig | Mapping[str, Any], error: Callable[[str], Exception], subject: str,
                    why: str) -> None:
    """Raise ``error("{subject} uses {key} ({what}), {why}")`` for the first unsupported LoRA variant
    ``config`` turns on (the one check for serving, training and merging)."""
    variants = PeftConfig.of(config).variants
    if variants:
        raise error(f"{subject} uses {variants[0]} ({UNSUPPORTED_VARIANTS[variants[0]]}), {why}")


# ------------------------------------------------------------------------------------ tensor keys


def lora_key(module: str, part: Literal["A", "B"]) -> str:
    """The key PEFT saves factor ``part`` of ``module`` under.

    >>> lora_key("model.layers.0.self_attn.q_proj", "A")
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def parse_lora_key(key: str) -> tuple[str, Literal["A", "B"]] | None:
    """``(module, "A" | "B")`` of a LoRA factor key, or None for any other key."""
    if not key.startswith(PEFT_PREFIX) or not key.endswith(_FACTOR_SUFFIXES):
        return None
    parts = key[len(PEFT_PREFIX):].rsplit(".", 2)
    if len(parts) != 3:  # "base_model.model.lora_A.weight": no module name
        return None
    return parts[0], "A" if parts[1] == "lora_A" else "B"


def peft_tensors(factors: Mapping[str, tuple[_T, _T]]) -> dict[str, _T]:
    """``module -> (A, B)`` as PEFT-keyed tensors, module by module, A before B."""
    out: dict[str, _T] = {}
    for module, (a, b) in factors.items():
        out[lora_key(module, "A")] = a
        out[lora_key(module, "B")] = b
    return out


def group_factors(tensors: Mapping[str, _T], unexpected: Callable[[str], Exception]) -> dict[str, tuple[_T | None, _T | None]]:
    """PEFT-keyed tensors as ``module -> (A, B)`` (None where a factor is absent); a key that is not a
    LoRA factor raises ``unexpected(key)``."""
    out: dict[str, list] = {}
    for key, value in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise unexpected(key)
        module, part = parsed
        out.setdefault(module, [None, None])[0 if part == "A" else 1] = value
    return {module: (a, b) for module, (a, b) in out.items()}


# ------------------------------------------------------------------------- fitting a base (one check)


def check_lora_fits(tensors: Mapping[str, Any], config: PeftConfig | Mapping[str, Any],
                    base_shapes: Mapping[str, tuple[int, int]], subject: str) -> None:
    """Raise :class:`~persona.errors.IncompatibleAdapter` unless ``tensors`` + ``config`` are a LoRA
    persona can serve on the base whose linear layers are ``base_shapes`` (:func:`linear_shapes`).

    The one check of weights that come from outside persona's own training (``persona import``,
    ``Store.create(tensors=...)``), before anything is written: a plain LoRA (no variant persona does
    not compute), target modules that exist on the base, every key a LoRA factor of a base module,
    both factors present, and A ``(r, in)``, B ``(out, r)`` for that module. (NaN and infinity are
    refused by the publish itself, for every path.)

    >>> check_lora_fits(tensors, config, linear_shapes(load_config(base_id)), "user:alice")   # doctest: +SKIP
    """
    from .errors import IncompatibleAdapter

    try:
        config = PeftConfig.of(config)
    except UnsupportedAdapter as exc:
        raise IncompatibleAdapter(f"{subject}: {exc}") from None
    if config.peft_type.upper() != "LORA":
        raise IncompatibleAdapter(f"{subject} is a {config.peft_type} adapter; persona serves LoRA adapters only")
    refuse_variants(config, IncompatibleAdapter, subject, "which persona cannot serve")
    _check_targets(config.document.get("target_modules"), base_shapes, subject)

    def unexpected(key: str) -> Exception:
        return IncompatibleAdapter(f"{subject}: tensor {key!r} is not a LoRA factor of a linear layer (persona "
                                   "serves LoRA A/B only: no embedding LoRA, biases or modules_to_save)")

    factors = group_factors(tensors, unexpected)
    if not factors:
        raise IncompatibleAdapter(f"{subject} holds no LoRA tensors")
    for module, (a, b) in sorted(factors.items()):
        if module not in base_shapes:
            raise IncompatibleAdapter(f"{subject}: module {module} does not exist in this base (an adapter for "
                                      "another architecture?); an adapter only works on the base it was made for")
        if a is None or b is None:
            raise IncompatibleAdapter(f"{subject}: module {module} has lora_{'B' if a is None else 'A'} without "
                                      f"lora_{'A' if a is None else 'B'}")
        fan_in, fan_out = base_shapes[module]
        want_a, want_b = (config.r, fan_in), (fan_out, config.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise IncompatibleAdapter(
                f"{subject}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; with r={config.r} this base "
                f"needs A {want_a} and B {want_b}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise IncompatibleAdapter(f"{subject}: {module}'s factors are {a.dtype}/{b.dtype}, not floating point")


def _check_targets(targets: Any, base_shapes: Mapping[str, tuple[int, int]], subject: str) -> None:
    """Every target name matches a linear layer of the base (PEFT's rules: a list of name suffixes, or
    one string that is a regular expression over full module names, or ``all-linear``)."""
    import re

    from .errors import IncompatibleAdapter

    if not targets or targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            hit = any(re.fullmatch(targets, name) for name in base_shapes)
        except re.error:
            hit = False
        if not hit:
            raise IncompatibleAdapter(f"{subject}: target_modules {targets!r} matches no linear layer of this base")
        return
    missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in base_shapes))
    if missing:
        raise IncompatibleAdapter(f"{subject}: target module(s) {', '.join(missing)} do not exist in this base "
                                  "(an adapter for another architecture?)")
