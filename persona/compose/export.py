"""Export a reference as a plain PEFT folder that any LoRA loader reads (PEFT, vLLM, LoRAX, TGI).

``export_adapter(store, "user:alice", "out/alice")`` writes exactly three files::

    adapter_config.json          PEFT's config; base_model_name_or_path is what a loader resolves
    adapter_model.safetensors    the LoRA factors, and nothing else
    README.md                    a model card: base, base fingerprint, the reference and its pinned
                                 versions, each part's lineage, metrics and data digest

A stack or a layered adapter (``user:carol`` runs with its layer) is several LoRAs; a PEFT folder holds
one, so those need ``merge=True``: the exact ``cat`` merge (:mod:`persona.compose.materialize`).
The folder is written beside ``dest`` under a temp name and renamed into place, so a reader never
sees half of it; ``dest`` must not exist or be empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._fs import dumps_json, fsync_tree, temp_sibling
from ..base import loader_name
from ..errors import ExportTargetExists, InvalidReference
from ..peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..refs import StackPart, format_weight
from ..store import Store, VersionInfo
from .materialize import merged_weights, pinned_name

__all__ = ["MODEL_CARD", "ExportResult", "export_adapter"]

MODEL_CARD = "README.md"


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: where, what it holds, and each file's sha256."""

    path: Path
    reference: str  # as given
    pinned: str  # the versions it holds: user:alice@v0003, or the pinned stack
    merged: bool
    base_model_name_or_path: str
    files: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path), "files": dict(self.files)}


def export_adapter(store: Store, reference: str, dest: str | os.PathLike, *, merge: bool = False) -> ExportResult:
    """Write ``reference`` (pinned now) to ``dest`` as a plain PEFT folder; see the module docstring.

    Raises :class:`InvalidReference` for a stack or layered adapter without ``merge``,
    :class:`ExportTargetExists` when ``dest`` holds files or lies inside the store, and what loading raises (hash-checked).

    >>> export_adapter(store, "user:carol", "carol-peft", merge=True).pinned   # doctest: +SKIP
    'user:carol@v0001+domain:finance@v0001'
    """
    from safetensors.torch import save

    dest = Path(dest).expanduser().absolute()
    _refuse_inside_store(store, dest)
    _refuse_occupied(dest)
    parts = store.pin_stack(reference)
    pinned = pinned_name(parts)
    merged = not (len(parts) == 1 and parts[0].weight == 1)
    if merged and not merge and len(parts) == 1:
        raise InvalidReference(
            f"{reference} is one adapter at weight {format_weight(parts[0].weight)} ({pinned}), and a PEFT folder "
            "has no weight: pass --merge to export it with the weight folded in, or export it without the weight"
        )
    if merged and not merge:
        raise InvalidReference(
            f"{reference} runs as {len(parts)} LoRA adapters ({pinned}), and a PEFT folder holds one: pass --merge "
            "to export their exact cat merge (equal to the stack), or export each adapter on its own"
        )
    if merged:
        tensors, config = merged_weights(store, parts)
    else:
        loaded = store.load(parts[0].ref)
        tensors, config = dict(loaded.tensors), dict(loaded.config)
    base_name = loader_name(store.config.base_id)
    config = {**config, "base_model_name_or_path": base_name, "inference_mode": True}
    infos = [store.version_info(p.ref) for p in parts]
    blobs = {
        ADAPTER_CONFIG: dumps_json(config),
        ADAPTER_WEIGHTS: save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}),
        MODEL_CARD: _model_card(store, reference, pinned, base_name, parts, infos, config).encode(),
    }
    _write_folder(dest, blobs)
    files = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    return ExportResult(dest, reference, pinned, merged, base_name, files)


def _refuse_inside_store(store: Store, dest: Path) -> None:
    # A folder written into the store root is read as a version, an adapter or a kind by list, verify
    # and the next publish (a stray user/NAME/v0002 breaks all three): export lands outside it.
    real = Path(os.path.realpath(dest))
    if real.is_relative_to(Path(os.path.realpath(store.root))):
        raise ExportTargetExists(f"{dest} is inside the adapter store {store.root}; export to a folder outside it")


def _refuse_occupied(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise ExportTargetExists(f"{dest} already exists and is not an empty folder; export into a new folder")


def _write_folder(dest: Path, blobs: Mapping[str, bytes]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    tmp.mkdir()
    try:
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        fsync_tree(tmp)
        _refuse_occupied(dest)  # again: something may have appeared while the weights were computed
        os.replace(tmp, dest)  # onto an absent or empty folder: atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_card(store: Store, reference: str, pinned: str, base_name: str, parts: Sequence[StackPart],
                infos: Sequence[VersionInfo], config: Mapping[str, Any]) -> str:
    cfg = store.config
    lines = [
        "---",
        f"base_model: {json.dumps(base_name)}",
        "library_name: peft",
        "tags: [persona, lora]",
        "---",
        "",
        f"# {pinned}",
        "",
        (f"Exported by persona from `{reference}`, pinned to `{pinned}`"
         + (" as their exact cat merge (equal to applying the stack)." if len(parts) > 1 or parts[0].weight != 1
            else ".")),
        "",
        f"- base: `{cfg.base_id}` (load it as `{base_name}`)",
        f"- base fingerprint: `{cfg.base_fingerprint}` (sha256 over the base's tensors; the weights only fit that base)",
        f"- LoRA: r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
        f"target_modules={json.dumps(config.get('target_modules'))}",
        "",
    ]
    for part, info in zip(parts, infos):
        weight = "" if part.weight == 1 else f" at weight {format_weight(part.weight)}"
        lines += [
            f"## {info.adapter}@{info.label}{weight}",
            "",
            f"- created: {info.created}; parent version: {info.parent or 'none'}",
            f"- weights sha256: `{info.files.get(ADAPTER_WEIGHTS)}`",
            f"- data digest: `{info.data_digest or 'none (not trained on data)'}`",
            f"- lineage: `{json.dumps(list(info.lineage), sort_keys=True)}`",
            f"- layered on: `{json.dumps(dict(info.over)) if info.over else 'nothing'}`",
            f"- metrics: `{json.dumps(dict(info.metrics), sort_keys=True)}`",
            "",
        ]
    return "\n".join(lines)
