"""``persona report``: one self-contained HTML file on what each update of some adapters did (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..training.config import UpdateConfig
from ._common import check_placement, emit, json_option, open_store, options_from, placement_options, store_option


@click.command()
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, writable=True),
              help="The HTML file to write (replaced atomically). Not inside the store.")
@click.option("--matrix/--no-matrix", default=True, show_default=True,
              help="Score every version on every kept held-out slice (loads the base). --no-matrix: the report "
                   "from meta.json alone, without torch.")
@options_from(UpdateConfig, {"max_length": "--max-length"})
@placement_options
@store_option
@json_option
def report(refs, out, matrix, max_length, device, dtype, store_root, as_json) -> None:
    """Write an HTML report on REF... (default: every adapter) to --out.

    \b
    One file, no network: plots are inline SVG. Per adapter: the version timeline
    (held-out loss before -> after each update, replay loss, the gate's verdict and
    reason, rows trained), the loss matrix as a heat map with BWT and FWT (see
    `persona eval --help`), and the lineage (parents, merges, layers). Across
    adapters: gain over the base, forgetting, and the adapters the gate keeps
    refusing. A pinned REF (user:alice@v3) shows the adapter as of that version.

    \b
    Examples:
      persona report --out report.html
      persona report user:alice user:bob --out alice-bob.html
      persona report --no-matrix --out quick.html --json
    """
    from tqdm.auto import tqdm

    from .._fs import atomic_write_bytes
    from ..base import Placement
    from ..report import build_report, render_report

    store = open_store(store_root)
    target = Path(out).expanduser().absolute()
    if Path(os.path.realpath(target)).is_relative_to(Path(os.path.realpath(store.root))):
        # a stray file under the root is read by list and verify as part of the store
        raise click.BadParameter(f"{target} is inside the adapter store {store.root}; write the report outside it",
                                 param_hint="'--out'")
    if matrix:
        check_placement(device, dtype)

    def progress(items):
        return tqdm(items, desc="report", unit="adapter", disable=None, leave=False)

    built = build_report(store, refs or None, matrix=matrix, placement=Placement(device, dtype), max_length=max_length,
                         progress=progress)
    data = render_report(built).encode("utf-8")
    atomic_write_bytes(target, data)
    names = [a.adapter for a in built.adapters]
    emit(as_json, {"path": str(target), "adapters": names, "bytes": len(data)},
         f"wrote {target} ({len(data) // 1024} KiB): {len(names)} adapter{'s' * (len(names) != 1)}")


COMMANDS = [report]
