"""LoRA settings and fresh adapter weights, in PEFT's own on-disk format.

A new adapter is built from the base's *config* alone: the model is instantiated on the meta device
(no weights read, no memory), the target ``nn.Linear`` modules are found, and A/B tensors are made
with PEFT's initialisation (A: Kaiming-uniform, B: zeros, so a new adapter leaves the base's output
unchanged). The keys and ``adapter_config.json`` are exactly what ``PeftModel.save_pretrained``
writes, so PEFT, vLLM, LoRAX and TGI load our versions as they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping

from .errors import InvalidConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidConfig(f"unknown LoRA setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data = dict(data)
        if data.get("target_modules") is not None:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)

    @classmethod
    def from_peft(cls, config: Mapping[str, Any]) -> "LoraSettings":
        """The settings of an existing adapter, from its ``adapter_config.json``."""
        targets = config.get("target_modules") or None
        if isinstance(targets, str):  # PEFT also allows one name or a regex
            targets = (targets,)
        return cls(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout") or 0.0),
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


def lora_shapes(config: Any, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``{module_name: (in_features, out_features)}`` for each targeted linear layer of the base."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and name != "lm_head"
    }
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
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    return tensors


def _kaiming_uniform(t, generator) -> None:
    # nn.init.kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT use, with our own generator.
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + 5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    t.uniform_(-bound, bound, generator=generator)


def peft_adapter_config(settings: LoraSettings, targets: tuple[str, ...], base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT would write for these settings."""
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
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and isinstance(value, str):  # PEFT's str enums
            value = value.value
        out[key] = value
    return out
