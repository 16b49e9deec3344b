"""CLI commands that manage the store and its adapters: ``init``, ``create``, ``list``, ``show``,
``alias``, ``rollback``, ``delete``, ``verify`` and ``base``."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

import click

from ..base import EMBEDDED_BASE
from ..errors import StoreNotInitialized
from ..peft_format import LoraSettings
from ..refs import parse_ref, parse_version
from ._common import FieldOption, emit, field_values, json_option, open_store, options_from, store_option


@click.command()
@click.option("--base", default=EMBEDDED_BASE, show_default=True,
              help="Base model: the embedded smollm2-135m-instruct, a local model folder, or a cached Hugging Face id.")
@store_option
@json_option
def init(base: str, store_root: str | None, as_json: bool) -> None:
    """Create a store bound to one base model (its id and weight fingerprint).

    \b
    Examples:
      persona init
      persona init --store /data/adapters --base ./my-base-model
    """
    from ..store import Store

    store = Store.init(store_root, base=base)
    cfg = store.config
    emit(as_json, {"store": str(store.root), "base": cfg.base_id, "fingerprint": cfg.base_fingerprint},
         f"store {store.root}\nbase  {cfg.base_id} ({cfg.base_fingerprint})")


@click.command()
@click.argument("ref")
@options_from(LoraSettings, {"rank": "--rank", "alpha": "--alpha", "dropout": "--dropout",
                             "target_modules": "--targets", "init": "--init", "seed": "--seed"})
@click.option("--over", default=None, metavar="REF",
              help="Layer the new user adapter on this domain/merged adapter (pinned at its current version): "
                   "updates train only the new adapter, inference applies both.")
@click.option("--from", "source", default=None, metavar="REF",
              help="Start from a copy of this adapter's weights (a warm start), recorded in the lineage.")
@store_option
@json_option
def create(ref, over, source, store_root, as_json, **lora) -> None:
    """Create adapter REF (e.g. user:alice) and publish its version v1.

    \b
    Examples:
      persona create user:alice
      persona create user:alice --over domain:finance
      persona create user:newbie --from merged:cohort-a
    """
    if source:  # a warm start copies the source's LoRA settings: an option that would be ignored is refused
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params
                 if isinstance(p, FieldOption) and p.source[0] is LoraSettings
                 and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--from copies {source}'s LoRA settings; {', '.join(given)} does not apply")
    settings = None if source else LoraSettings(**field_values(LoraSettings, lora))
    info = open_store(store_root).create(parse_ref(ref), settings, over=over, source=source)
    # the rank and targets the published version has (a --from copy has its source's, not the defaults)
    emit(as_json, info.to_dict(), f"created {info.adapter}@{info.label} (rank {info.lora.get('rank')}; "
                                  f"adapts {', '.join(info.lora.get('target_modules') or [])})")


@click.command("list")
@click.option("--kind", type=click.Choice(["user", "domain", "merged"]), default=None, help="Only adapters of this kind.")
@store_option
@json_option
def list_(kind, store_root, as_json) -> None:
    """List the adapters in the store.

    \b
    Examples:
      persona list
      persona list --kind domain --json
    """
    adapters = open_store(store_root).list(kind)
    if as_json:
        emit(True, [{"adapter": a.adapter, "current": a.current, "versions": len(a.versions),
                     "aliases": dict(a.aliases), "pending": a.pending, "damaged": [str(p) for p in a.damaged]}
                    for a in adapters])
        return
    if not adapters:
        click.echo("no adapters yet: create one with `persona create user:NAME`")
        return
    click.echo(f"{'ADAPTER':32} {'CURRENT':>8} {'VERSIONS':>8} {'PENDING':>8}")
    for a in adapters:
        cur = f"v{a.current}" if a.current else "-"
        damaged = f"  DAMAGED: {a.damaged[0]}" + (f" (+{len(a.damaged) - 1} more)" if len(a.damaged) > 1 else "") if a.damaged else ""
        click.echo(f"{a.adapter:32} {cur:>8} {len(a.versions):>8} {a.pending:>8}{damaged}")


@click.command()
@click.argument("ref")
@store_option
@json_option
def show(ref, store_root, as_json) -> None:
    """Show an adapter's versions, aliases and metrics (REF@vN or REF@alias: that version only).

    \b
    Examples:
      persona show user:alice
      persona show user:alice@v2 --json
      persona show user:alice@candidate
    """
    from ..training.supersede import metrics_summary as superseded_summary

    store, parsed = open_store(store_root), parse_ref(ref)
    info = store.show(parsed)
    if parsed.version is not None or parsed.alias is not None:  # user:alice@v9 is an error, not all of alice
        pinned = store.resolve(parsed).version
        info = replace(info, versions=tuple(v for v in info.versions if v.version == pinned))
    if as_json:
        emit(True, info.to_dict())
        return
    layer = ""
    if info.versions and info.versions[-1].over:
        layer = f"  over={info.versions[-1].over['adapter']}@v{info.versions[-1].over['version']}"
    click.echo(f"{info.adapter}  current=v{info.current}  pending={info.pending}  replay={info.replay}{layer}")
    trained = [(v.label, v.metrics["heldout_loss_after"]) for v in info.versions
               if isinstance(v.metrics.get("heldout_loss_after"), (int, float))]
    if len(trained) >= 2:
        losses = [loss for _, loss in trained]
        click.echo(f"  held-out loss after each update  {sparkline(losses)}  {_fmt(losses[0])} -> {_fmt(losses[-1])}  "
                   f"({trained[0][0]}..{trained[-1][0]}, each on its own update's slice)")
    for problem in info.damaged:
        click.echo(f"  DAMAGED {problem}")
    for v in info.versions:
        aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
        parent = f" parent=v{v.parent}" if v.parent else ""
        origin = f"  from {v.origin}" if v.origin else ""  # "from auto-update": published by serve --auto-update
        click.echo(f"  {v.label}{aliases}{parent}  {v.created}{origin}")
        m = v.metrics
        if "heldout_loss_after" in m:
            click.echo(f"      held-out loss {_fmt(m.get('heldout_loss_before'))} -> {_fmt(m.get('heldout_loss_after'))}, "
                       f"replay loss {_fmt(m.get('replay_loss_before'))} -> {_fmt(m.get('replay_loss_after'))}, "
                       f"{m.get('steps')} steps, {_fmt(m.get('seconds'))}s")
        if isinstance(m.get("gate"), dict):
            verdict = "promoted" if m["gate"].get("promoted") else "kept as candidate"
            click.echo(f"      gate: {verdict}: {m['gate'].get('reason')}")
        superseded = superseded_summary(m)
        if superseded:
            click.echo(f"      {superseded}")
        for parent_entry in v.lineage:
            click.echo(f"      lineage: {parent_entry.get('relation', 'parent')} {parent_entry.get('adapter')}@v{parent_entry.get('version')}")
        if v.imported:
            revision = f"@{v.imported['revision']}" if v.imported.get("revision") else ""
            click.echo(f"      imported from {v.imported.get('source')}{revision}")


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One block character per value, low to high (``▇▄▂▁`` for a falling loss); flat series sit at the bottom."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    low, span = min(finite), max(finite) - min(finite)
    top = len(SPARKS) - 1
    return "".join(" " if not math.isfinite(v) else SPARKS[round((v - low) / span * top) if span else 0]
                   for v in values)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@click.command()
@click.argument("ref")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--remove", is_flag=True, help="Remove alias NAME instead of setting it.")
@store_option
@json_option
def alias(ref, name, version, remove, store_root, as_json) -> None:
    """Point alias NAME of adapter REF at VERSION.

    \b
    Examples:
      persona alias user:alice stable v3
      persona alias user:alice stable --remove
    """
    store = open_store(store_root)
    if remove:
        store.remove_alias(parse_ref(ref), name)
        emit(as_json, {"adapter": parse_ref(ref).id, "alias": name, "removed": True}, f"removed alias {name}")
        return
    if version is None:
        raise click.UsageError("give the VERSION the alias should point at (e.g. v3), or --remove")
    store.set_alias(parse_ref(ref), name, version)
    number = parse_version(version)
    emit(as_json, {"adapter": parse_ref(ref).id, "alias": name, "version": number}, f"{parse_ref(ref).id}@{name} -> v{number}")


@click.command()
@click.argument("ref")
@click.argument("version")
@store_option
@json_option
def rollback(ref, version, store_root, as_json) -> None:
    """Move REF's current alias to VERSION.

    \b
    Examples:
      persona rollback user:alice v2
    """
    open_store(store_root).rollback(parse_ref(ref), version)
    number = parse_version(version)
    emit(as_json, {"adapter": parse_ref(ref).id, "current": number}, f"{parse_ref(ref).id}@current -> v{number}")


@click.command()
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--cascade", is_flag=True, help="Also delete the adapters derived from REF (merged from it, started from it, layered on it).")
@store_option
@json_option
def delete(ref, yes, cascade, store_root, as_json) -> None:
    """Delete adapter REF: every version, its replay buffer, pending interactions and server tokens.

    An adapter others were derived from is refused (the error lists them) unless --cascade,
    so deleting a person's adapter cannot leave their data inside a merge.

    \b
    Examples:
      persona delete user:alice --yes
      persona delete domain:finance --yes --cascade
    """
    parsed = parse_ref(ref)
    store = open_store(store_root)
    info = store.show(parsed)
    dependents = [d.adapter for d in store.dependents(parsed)] if cascade else []
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(f"refusing to delete {parsed.id} without confirmation: pass --yes")
        also = f" and {', '.join(dependents)}" if dependents else ""
        click.confirm(f"delete {parsed.id} ({len(info.versions)} versions){also}?", abort=True)
    deleted = store.delete(parsed, cascade=cascade)
    emit(as_json, {"adapter": parsed.id, "deleted": list(deleted), "versions": len(info.versions)},
         f"deleted {', '.join(deleted)}")


@click.command()
@click.argument("ref", required=False)
@store_option
@json_option
def verify(ref, store_root, as_json) -> None:
    """Re-hash every published file (of REF, or of the whole store); exit 1 on any mismatch.

    \b
    Examples:
      persona verify
      persona verify user:alice --json
    """
    report = open_store(store_root).verify(parse_ref(ref) if ref else None)
    if as_json:
        emit(True, report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"PROBLEM {p}")
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"{status}: {report.adapters} adapters, {report.versions} versions, {report.files} files checked")
    if not report.ok:
        sys.exit(1)


@click.command()
@click.option("--base", "base_id", default=None, help="Describe this base instead of the store's.")
@store_option
@json_option
def base(base_id, store_root, as_json) -> None:
    """Show the base model: id, local path, fingerprint, architecture, and loader_name (what to point
    vLLM or PEFT at).

    \b
    Examples:
      persona base
      persona base --base smollm2-135m-instruct --json
    """
    from ..base import base_info, loader_name

    if base_id is None:
        try:
            base_id = open_store(store_root).config.base_id
        except StoreNotInitialized:
            base_id = EMBEDDED_BASE
    # loader_name: what to give vLLM or PEFT as the base (see `persona export`, docs/ARCHITECTURE.md)
    data = {**base_info(base_id).to_dict(), "loader_name": loader_name(base_id)}
    emit(as_json, data, "\n".join(f"{k:13} {v}" for k, v in data.items()))


COMMANDS = [init, create, list_, show, alias, rollback, delete, verify, base]
