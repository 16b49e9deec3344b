"""A vLLM LoRA resolver over a persona store: vLLM serves any persona reference as a LoRA.

vLLM finds it through the entry point ``persona = "persona.integrations.vllm:register"`` in the group
``vllm.general_plugins`` (declared in persona's ``pyproject.toml``), configured by two variables::

    PERSONA_HOME=/shared/adapters            # the store's root, as for every persona command
    PERSONA_VLLM_BASE_NAME=...               # optional: the model name vLLM was started with

    PERSONA_HOME=/shared/adapters VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
        vllm serve LOADER_NAME --served-model-name BASE_ID --enable-lora --max-lora-rank 64

(``persona base --json`` prints both names. ``LOADER_NAME`` (:func:`persona.base.loader_name`) is
what vLLM loads: the Hub id, a local base's absolute path, or the embedded base's converted folder.
``BASE_ID`` is the store's base id, the name ``persona serve --upstream`` sends for the base. Without
``PERSONA_VLLM_BASE_NAME`` the resolver accepts either name; with it, only that one.) A request's ``model``
is any persona reference: ``user:alice``, ``user:alice@v3``, ``user:alice@current``, a stack
``user:alice+domain:finance*0.5`` or a layered adapter. The resolver pins it and returns a
``LoRARequest`` named with the versions (``user:alice@v0003``) whose path is

- the version's own folder, re-hashed first (``Store.version_folder``), for one adapter at weight 1
  that is not layered;
- otherwise the stack's exact ``cat`` merge, cached in the store by content
  (:mod:`persona.compose.materialize`), since vLLM applies one LoRA per request.

``lora_int_id`` is a stable 63-bit id from sha256 of the pinned name (or of the merge's content key),
never Python's salted ``hash()``: the same version gets the same id in every process, a new version a
new id. Anything that cannot be served safely resolves to ``None`` with the reason logged on the
``persona.vllm`` logger: an unknown adapter, a bad reference, ``domain:auto`` (routed per prompt by
persona's engine or gateway, not here), a tampered file, a version bound to another base, or a
``base_model_name`` that is not this store's base.

**Resolve ``current`` per request.** vLLM 0.33 caches a resolved adapter under the name the client
sent (``OpenAIServingModels.lora_requests``) and never asks the resolver again for it, and it replaces
``lora_int_id`` with its own counter. So a client that sends ``user:alice`` keeps getting the version
pinned on first use; send pinned names (``user:alice@v0003``), which is what ``persona serve
--upstream`` does for every request (vllm-project/vllm#42125 is the same bug with reused names).

Install: ``pip install 'persona[vllm]'`` and vLLM itself, which on a GPU machine is a plain
``pip install vllm``; on a CPU-only test machine ``pip install --no-deps vllm`` (its declared
dependencies pull a CUDA torch), which is enough to import the resolver classes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from ..base import loader_name
from ..compose.materialize import materialize, pinned_name
from ..errors import PersonaError
from ..store import Store

__all__ = ["BASE_NAME_ENV", "RESOLVER_NAME", "PersonaLoRAResolver", "ResolvedAdapter", "register", "resolve_adapter",
           "stable_id"]

RESOLVER_NAME = "persona"
BASE_NAME_ENV = "PERSONA_VLLM_BASE_NAME"
logger = logging.getLogger("persona.vllm")


def stable_id(text: str) -> int:
    """A positive 63-bit id from sha256 of ``text``: the same in every process (unlike ``hash()``).

    >>> stable_id("user:alice@v0003") == stable_id("user:alice@v0003") > 0
    True
    """
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1) or 1


@dataclass(frozen=True)
class ResolvedAdapter:
    """What a persona reference resolved to: the name vLLM caches it under, its folder, its id."""

    name: str  # pinned: user:alice@v0003, or the pinned stack user:carol@v0001+domain:finance@v0001
    path: Path
    lora_int_id: int
    merged: bool  # True: a materialized cat merge of a stack; False: the version folder itself


def resolve_adapter(store: Store, reference: str) -> ResolvedAdapter:
    """Pin ``reference`` and return a checked folder for it (blocking; raises ``PersonaError``)."""
    parts = store.pin_stack(reference)
    if len(parts) == 1 and parts[0].weight == 1:
        name = pinned_name(parts)
        return ResolvedAdapter(name, store.version_folder(parts[0].ref), stable_id(name), merged=False)
    merged = materialize(store, parts)
    return ResolvedAdapter(merged.name, merged.path, stable_id(f"merge:{merged.key}"), merged=True)


class PersonaLoRAResolver(LoRAResolver):
    """vLLM's ``LoRAResolver`` over the persona store at ``root`` (default ``$PERSONA_HOME``).

    ``base_name`` is the model name vLLM serves (default ``$PERSONA_VLLM_BASE_NAME``, else the store's
    base id or its :func:`~persona.base.loader_name`); a request for another base resolves to ``None``.
    The store is opened on first use, so registering costs nothing in processes that never resolve.
    """

    def __init__(self, root: str | os.PathLike | None = None, base_name: str | None = None):
        self._root = root
        self._base_name = base_name or os.environ.get(BASE_NAME_ENV) or None
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self._root)
        return self._store

    @property
    def base_names(self) -> tuple[str, ...]:
        """The names vLLM may serve this store's base under: ``$PERSONA_VLLM_BASE_NAME`` alone when
        set; else the store's base id (what ``persona serve --upstream`` sends for the base, so start
        vLLM with ``--served-model-name`` set to it) and the base's loader name (vLLM's default name)."""
        if self._base_name is not None:
            return (self._base_name,)
        base_id = self.store.config.base_id
        return tuple(dict.fromkeys((base_id, loader_name(base_id))))

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The pinned ``LoRARequest`` for ``lora_name``, or ``None`` (reason logged on ``persona.vllm``).

        Store reads, hashing and a first merge run in a worker thread, off vLLM's event loop."""
        return await asyncio.to_thread(self._resolve, base_model_name, lora_name)

    def _resolve(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            if base_model_name not in self.base_names:
                logger.warning("not resolving %r: vLLM serves base %r, but the persona store %s is bound to %s "
                               "(set %s if that is the same model under another name)", lora_name,
                               base_model_name, self.store.root, " or ".join(map(repr, self.base_names)),
                               BASE_NAME_ENV)
                return None
            found = resolve_adapter(self.store, lora_name)
        except (PersonaError, OSError) as exc:
            logger.warning("not resolving %r: %s", lora_name, exc)
            return None
        except Exception:  # vLLM awaits resolvers without a try: this would fail the request, others unasked
            logger.exception("not resolving %r: unexpected error (a bug in persona)", lora_name)
            return None
        logger.info("resolved %r to %s (%s)", lora_name, found.name, "merged" if found.merged else "version folder")
        return LoRARequest(lora_name=found.name, lora_int_id=found.lora_int_id, lora_path=str(found.path),
                           base_model_name=base_model_name)


def register() -> None:
    """vLLM's plugin entry point: register :class:`PersonaLoRAResolver` as ``persona``."""
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, PersonaLoRAResolver())
