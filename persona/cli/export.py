"""``persona export``: a reference as a plain PEFT folder for other loaders (PEFT, vLLM, LoRAX, TGI)."""

from __future__ import annotations

import click

from ._common import emit, json_option, open_store, store_option


@click.command()
@click.argument("ref")
@click.argument("dest", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--merge", is_flag=True,
              help="For a stack or a layered adapter (several LoRAs): write their exact cat merge, one LoRA equal "
                   "to the stack. Without it such references are refused.")
@store_option
@json_option
def export(ref, dest, merge, store_root, as_json) -> None:
    """Export REF, pinned now, to DIR as a plain PEFT adapter folder.

    DIR gets exactly adapter_config.json, adapter_model.safetensors and a model card README.md (base,
    base fingerprint, the pinned versions, lineage, metrics, data digest). DIR must not exist or be
    empty; it appears whole or not at all. base_model_name_or_path names the base as a loader finds it:
    the Hub id, a local base's absolute path, or the embedded base's converted folder.

    \b
    Examples:
      persona export user:alice ./alice-peft
      persona export user:alice@v3 ./alice-v3 --json
      persona export "user:alice+domain:finance*0.5" ./alice-finance --merge
      persona export user:carol ./carol --merge        (carol is layered on a domain adapter)

    \b
    Load it with PEFT:
      PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "./alice-peft")
    """
    from ..compose.export import export_adapter

    result = export_adapter(open_store(store_root), ref, dest, merge=merge)
    kind = "cat merge of " if result.merged else ""
    emit(as_json, result.to_dict(),
         f"exported {kind}{result.pinned} to {result.path}\nbase_model_name_or_path {result.base_model_name_or_path}")


COMMANDS = [export]
