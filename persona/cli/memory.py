"""CLI commands for a user adapter's retrieval memory: ``memory show|search|forget`` (docs/MEMORY.md)."""

from __future__ import annotations

import click

from ..refs import parse_ref
from ._common import emit, json_option, open_store, store_option

PREVIEW = 72  # characters of an entry's text shown per line


@click.group()
def memory() -> None:
    """A user adapter's memory: every interaction logged for it, searchable at once.

    \b
    Examples:
      persona memory show user:alice
      persona memory search user:alice "cat's name" -k 3
      persona memory forget user:alice --match "Lisbon"
    """


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW else flat[: PREVIEW - 1] + "…"


@memory.command("show")
@click.argument("ref")
@store_option
@json_option
def memory_show(ref, store_root, as_json) -> None:
    """List REF's memory entries, oldest first (id, time, text preview).

    \b
    Examples:
      persona memory show user:alice --json
    """
    mem = open_store(store_root).memory(parse_ref(ref))
    entries = mem.entries()
    snap = mem.snapshot()
    lines = [f"{e.id}  {e.time[:19]}  {_preview(e.text)}" for e in entries]
    emit(as_json, {"adapter": mem.ref.id, **snap.record(), "items": [e.to_dict() for e in entries]},
         "\n".join(lines + [f"{len(entries)} entries in {mem.ref.id}'s memory"]))


@memory.command("search")
@click.argument("ref")
@click.argument("query")
@click.option("-k", "k", default=4, show_default=True, type=click.IntRange(1, 64), help="How many entries at most.")
@store_option
@json_option
def memory_search(ref, query, k, store_root, as_json) -> None:
    """The entries of REF's memory that best match QUERY (BM25), best first.

    \b
    Examples:
      persona memory search user:alice "What is my cat's name?" -k 2
    """
    mem = open_store(store_root).memory(parse_ref(ref))
    hits = mem.search(query, k)
    text = "\n".join(f"{h.score:7.3f}  {h.entry.id}  {_preview(h.entry.text)}" for h in hits) or "no entry matches"
    emit(as_json, {"adapter": mem.ref.id, "query": query, "hits": [h.to_dict() for h in hits]}, text)


@memory.command("forget")
@click.argument("ref")
@click.option("--match", "match", default=None, metavar="TEXT", help="Forget every row whose text contains TEXT (any case).")
@click.option("--id", "entry_id", default=None, metavar="ID", help="Forget one memory entry (and the same interaction "
              "in the pending queue and the replay buffer).")
@store_option
@json_option
def memory_forget(ref, match, entry_id, store_root, as_json) -> None:
    """Remove rows from REF's memory, pending queue and replay buffer.

    \b
    The adapter's weights keep what they learned from those rows until the
    next update retrains it (`persona update REF`); versions already
    published are not rewritten (delete the adapter to remove them).

    \b
    Examples:
      persona memory forget user:alice --match "Lisbon"
      persona memory forget user:alice --id m-3f2a9c0b71d4 --json
    """
    if (match is None) == (entry_id is None):
        raise click.UsageError("give exactly one of --match TEXT and --id ID")
    mem = open_store(store_root).memory(parse_ref(ref))
    report = mem.forget(match=match, entry_id=entry_id)
    note = (f"the adapter's weights keep what they learned until the next retrain (`persona update {mem.ref.id}`); "
            "published versions are not rewritten")
    emit(as_json, {"adapter": mem.ref.id, "removed": report.to_dict(), "note": note},
         f"forgot {report.memory} memory entries, {report.pending} pending and {report.replay} replay rows of "
         f"{mem.ref.id}\nnote: {note}")


COMMANDS = [memory]
