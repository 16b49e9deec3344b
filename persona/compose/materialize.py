"""A stack as one plain LoRA adapter, for engines that apply one LoRA per request (vLLM, LoRAX, TGI,
PEFT) and for ``persona export --merge``.

``materialize(store, "user:carol")`` pins the model string as persona's engine serves it
(``Store.pin_stack``: ``user:carol@v1+domain:finance@v1``, the layer included), merges the parts with
the exact ``cat`` merge (:func:`persona.compose.merge.cat_adapters`: each part's A scaled by
``w * alpha / r`` and stacked, B stacked, ``lora_alpha == r``), and caches the result in the store by
content (``Store.materialized``): the key is a sha256 over the pinned parts (adapter, version, sha256
of the weights, weight in the stack) and the base fingerprint, so the same inputs find the same folder,
built once, and a moved ``current`` finds a new one. The folder is re-hashed before it is handed out,
and deleting any of its parts deletes it.

>>> m = materialize(store, "user:alice+domain:finance*0.5")   # doctest: +SKIP
>>> m.name, m.path.name == m.key
('user:alice@v0003+domain:finance@v0001*0.5', True)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InvalidReference
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..refs import StackPart, format_version, format_weight
from ..store import Store
from .merge import cat_adapters, check_parents

__all__ = ["KEY_FORMAT", "Materialized", "content_key", "materialize", "merged_weights", "pinned_name"]

# Part of every content key: a change to what a materialized folder holds changes this, so old
# entries are never read as new ones.
KEY_FORMAT = "persona-cat-merge/1"


@dataclass(frozen=True)
class Materialized:
    """A stack materialized as one adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    name: str  # the pinned stack, every version spelled out: user:carol@v0001+domain:finance@v0001
    parts: tuple[StackPart, ...]
    key: str  # the content key (sha256 hex), also the folder's name
    path: Path
    files: Mapping[str, str]  # file name -> sha256, checked when handed out
    built: bool  # whether this call built it (False: an intact cached entry was reused)


def pinned_name(parts: Sequence[StackPart]) -> str:
    """A pinned stack with zero-padded version labels, the form caches key on: ``user:a@v0003+domain:b@v0001*0.5``."""
    out = []
    for part in parts:
        text = f"{part.ref.id}@{format_version(part.ref.version)}"
        out.append(text if part.weight == 1 else f"{text}*{format_weight(part.weight)}")
    return "+".join(out)


def content_key(store: Store, parts: Sequence[StackPart]) -> str:
    """sha256 over the base fingerprint and each pinned part's adapter, version, sha256 of its weights and
    of its config (alpha and r scale it), and weight."""
    described = []
    for part in parts:
        info = store.version_info(part.ref)
        described.append([info.adapter, info.version, info.files.get(ADAPTER_WEIGHTS), info.files.get(ADAPTER_CONFIG),
                          repr(float(part.weight))])
    payload = {"format": KEY_FORMAT, "base": store.config.base_fingerprint, "parts": described}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def merged_weights(store: Store, parts: Sequence[StackPart]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, adapter_config)`` of the cat merge of pinned ``parts``, computed now (no cache)."""
    loaded = [store.load(p.ref) for p in parts]  # hash-checked, this base only
    check_parents(store, "cat", loaded)
    return cat_adapters(loaded, [p.weight for p in parts], store.config.base_id)


def materialize(store: Store, model: str | Sequence[StackPart]) -> Materialized:
    """Pin ``model`` (an adapter, a layered adapter or a stack) and return its cat merge, from the
    store's cache or built now (once, under a lock; concurrent callers wait and reuse it). ``model``
    may also be parts already pinned by ``Store.pin_stack``.

    Equal to the stack as persona's engine serves it (the tests check logits within 1e-5). Raises what
    pinning raises (``AdapterNotFound``, ``InvalidReference`` for ``domain:auto``), ``BaseMismatch`` /
    ``IntegrityError`` for a part that is not intact on this base, ``InvalidConfig`` for parts ``cat``
    cannot merge (LoRA variants, shapes that do not fit the base, rank over 1024).
    """
    parts = store.pin_stack(model) if isinstance(model, str) else tuple(model)
    if not parts or any(p.ref.version is None for p in parts):
        raise InvalidReference(f"materialize takes a model string or pinned parts, got {parts!r}")
    key = content_key(store, parts)

    entry = store.materialized(key, [p.ref for p in parts], lambda: merged_weights(store, parts))
    return Materialized(pinned_name(parts), parts, key, entry.path, entry.files, entry.built)
