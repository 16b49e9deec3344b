"""``persona import``: bring an existing PEFT LoRA adapter into the store as v1 of a new adapter.

The source is a local folder or a Hugging Face Hub id. A Hub id is fetched with
``huggingface_hub.snapshot_download`` limited to PEFT's two adapter files, so it honours
``HF_HUB_OFFLINE`` and the local cache, and never downloads a pickle (``adapter_model.bin``: refused,
persona reads safetensors only). The weights are checked against the store's base before anything is
written, by the same check ``Store.create(tensors=...)`` runs (:func:`persona.peft_format.check_lora_fits`):
a plain LoRA, target modules the base has, every tensor shaped for its module, no NaN or infinity.

The version records where it came from (``meta.json`` ``imported``: source folder or Hub id, the
Hub commit, and the sha256 of each file as read), and is bound to the store's base like any other:
``adapter_config.json`` is kept as written except ``base_model_name_or_path`` (the store's base) and
``inference_mode`` (off, as every stored config). Factors are stored as float32 (persona's training
and serving state; exact for fp16/bf16 sources).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import read_regular_file
from ..errors import (AdapterExists, AdapterSourceNotFound, IncompatibleAdapter, IntegrityError, InvalidConfig,
                      UnsafeWeightFile)
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, PeftConfig, parse_lora_key
from ..refs import parse_ref

if TYPE_CHECKING:
    from ..store import Store, VersionInfo

__all__ = ["ADAPTER_FILES", "AdapterSource", "fetch_adapter", "import_adapter"]

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # the only files read (and fetched from the Hub)
PICKLE_WEIGHTS = "adapter_model.bin"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class AdapterSource:
    """A PEFT adapter folder ready to read: where it is, what the user named, and the Hub commit."""

    folder: Path
    source: str  # the absolute folder, or the Hub id
    revision: str | None  # the Hub commit the files come from; None for a local folder


def fetch_adapter(source: str, revision: str | None = None) -> AdapterSource:
    """A local folder as it is, or a Hub id's ``adapter_config.json`` + ``adapter_model.safetensors``
    (from the local cache when ``HF_HUB_OFFLINE`` is set); :class:`AdapterSourceNotFound` otherwise.

    >>> fetch_adapter("./my-adapter").revision is None   # doctest: +SKIP
    True
    """
    local = Path(source).expanduser()
    if local.is_dir():
        if revision is not None:
            raise InvalidConfig(f"--revision applies to a Hub id, not to the local folder {source}")
        return AdapterSource(local.resolve(), str(local.resolve()), None)
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source:
        raise AdapterSourceNotFound(f"no adapter folder {source!r}: give a folder holding {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS}, or a Hugging Face id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available here"
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        hint = (" (HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it once where the "
                "network is reachable, or give a local folder)") if offline else ""
        raise AdapterSourceNotFound(f"cannot fetch adapter {source!r}{'@' + revision if revision else ''}{hint}: "
                                    f"{exc.__class__.__name__}") from None
    commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
    return AdapterSource(folder, source, commit)


def _read(fetched: AdapterSource, name: str) -> bytes:
    path = fetched.folder / name
    try:
        # the Hub cache links snapshot files to blobs: follow the link, then refuse anything not a plain file
        return read_regular_file(path.resolve(strict=True))
    except FileNotFoundError:
        if name == ADAPTER_WEIGHTS and (fetched.folder / PICKLE_WEIGHTS).exists():
            raise UnsafeWeightFile(
                f"{fetched.source} holds {PICKLE_WEIGHTS}, a pickle file; persona reads safetensors only. Convert it "
                "first: load it with PEFT and save_pretrained(DIR, safe_serialization=True)") from None
        hub = f" (persona fetches only {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; a repository with only "\
              f"{PICKLE_WEIGHTS} must be converted to safetensors first)" if fetched.revision else ""
        raise AdapterSourceNotFound(f"{fetched.source} has no {name}: not a PEFT adapter folder{hub}") from None
    except IntegrityError as exc:
        raise AdapterSourceNotFound(f"{fetched.source}: {name} is not a regular file ({exc})") from None


def _settings(config: PeftConfig, tensors: dict[str, Any], subject: str) -> LoraSettings:
    """What ``meta.json`` records under ``lora``: r, alpha, dropout and the module names the tensors adapt
    (PEFT also allows one regular expression as ``target_modules``; the tensors say what it matched)."""
    targets = sorted({parsed[0].rsplit(".", 1)[-1] for key in tensors if (parsed := parse_lora_key(key))})
    try:
        return LoraSettings(rank=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=tuple(targets) or None)
    except InvalidConfig as exc:
        raise IncompatibleAdapter(f"{subject}: {exc}") from None


def import_adapter(store: Store, source: str, into: str, *, revision: str | None = None) -> VersionInfo:
    """Import the PEFT LoRA adapter at ``source`` (a folder or a Hub id) as the first version of ``into``.

    Refused before anything is written (and the store unchanged): an adapter that exists already, a
    source that is not there, a pickle weight file, a config that is not a plain LoRA, a target module
    or tensor shape that does not fit the store's base, NaN or infinity.

    >>> import_adapter(store, "./exported", "user:alice").label                   # doctest: +SKIP
    'v0001'
    >>> import_adapter(store, "org/alice-lora", "user:alice", revision="main")   # doctest: +SKIP
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    ref = parse_ref(into)
    if store.exists(ref.unpinned()):
        raise AdapterExists(f"{ref.unpinned().id} already exists; import into a new name, or delete it first")
    fetched = fetch_adapter(source, revision)
    raw = {name: _read(fetched, name) for name in ADAPTER_FILES}
    subject = f"{fetched.source} (imported as {ref.id})"
    try:
        document = json.loads(raw[ADAPTER_CONFIG])
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        config = PeftConfig.from_json(document)
    except (ValueError, RecursionError) as exc:
        reason = exc if isinstance(exc, IncompatibleAdapter) else f"not a usable {ADAPTER_CONFIG}: {exc}"
        raise IncompatibleAdapter(f"{subject}: {reason}") from None
    try:
        loaded = load_safetensors(raw[ADAPTER_WEIGHTS])
    except (SafetensorError, ValueError) as exc:
        raise IncompatibleAdapter(f"{subject}: {ADAPTER_WEIGHTS} is not a readable safetensors file ({exc})") from None
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in loaded.items()}
    document = {**document, "base_model_name_or_path": store.config.base_id, "inference_mode": False}
    imported = {
        "source": fetched.source,
        "revision": fetched.revision,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in raw.items()},
    }
    # Store.create runs the one shape/target/variant check against the base, then the publish refuses
    # NaN/inf: both before a file is written.
    return store.create(ref, _settings(config, tensors, subject), tensors=tensors, adapter_config=document,
                        imported=imported)
