"""CLI command that brings an existing PEFT LoRA adapter into the store: ``import``."""

from __future__ import annotations

import click

from ._common import emit, json_option, open_store, store_option


@click.command("import")
@click.argument("source", metavar="DIR_OR_HUB_ID")
@click.option("--as", "into", required=True, metavar="REF",
              help="The new adapter to create, e.g. user:alice (its v1 holds the imported weights).")
@click.option("--revision", default=None, metavar="REV",
              help="Branch, tag or commit of a Hub id (default: main). Not for a local folder.")
@store_option
@json_option
def import_adapter(source, into, revision, store_root, as_json) -> None:
    """Import a PEFT LoRA adapter (a folder, or a Hugging Face id) as v1 of a new adapter.

    \b
    Only adapter_config.json and adapter_model.safetensors are read (a Hub
    id fetches only those; HF_HUB_OFFLINE=1 reads the local cache). The
    weights are checked against the store's base first: a plain LoRA, target
    modules the base has, every tensor's shape, no NaN/inf. Nothing is written
    when a check fails. A pickle adapter_model.bin is refused: convert it with
    PEFT's save_pretrained(DIR, safe_serialization=True).
    `persona show REF` names the source, Hub commit and file hashes.

    \b
    Examples:
      persona import ./alice-lora --as user:alice
      persona import my-org/support-lora --as domain:support --revision v2
      HF_HUB_OFFLINE=1 persona import my-org/support-lora --as domain:support
    """
    from ..compose.peft_import import import_adapter as run_import

    info = run_import(open_store(store_root), source, into, revision=revision)
    where = info.imported["source"] + (f"@{info.imported['revision']}" if info.imported.get("revision") else "")
    emit(as_json, info.to_dict(),
         f"imported {where} -> {info.adapter}@{info.label} (rank {info.lora.get('rank')}, "
         f"{len(info.lora.get('target_modules') or [])} target module kinds)")


COMMANDS = [import_adapter]
