"""Facts the engine reads off its base once: context length, end-of-sequence ids, logits width, dtype check."""

from __future__ import annotations

import torch

from ..base import BaseModel, resolve_device
from ..errors import InvalidConfig

__all__ = ["check_base_dtype", "context_length", "eos_ids", "vocab_size"]


def check_base_dtype(base: BaseModel, dtype: str | torch.dtype | None) -> None:
    """A given base runs in the dtype it was loaded in; asking for another one is refused, not converted."""
    if dtype is None or dtype == "auto":
        return
    have = next(base.model.parameters()).dtype
    want = resolve_device(next(base.model.parameters()).device, dtype)[1]
    if want != have:
        raise InvalidConfig(f"the given base is loaded in {str(have).removeprefix('torch.')}, not "
                            f"{str(want).removeprefix('torch.')}: load it with load_base(..., dtype=...) "
                            "or leave dtype out")


def vocab_size(model, tokenizer) -> int:
    """Width of the logits (models often pad their vocabulary past the tokenizer's)."""
    embeddings = model.get_output_embeddings()
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else max(int(model.config.vocab_size), len(tokenizer))


def context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, (list, tuple)):
        ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
