"""The ``persona`` command: a thin layer that parses, calls one library function, and prints.

Every command takes ``--store`` (default ``$PERSONA_HOME`` or ``./adapters``) and ``--json``.
Library errors become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .base import EMBEDDED_BASE, base_info
from .errors import PersonaError, StoreNotInitialized
from .lora import LoraSettings
from .refs import parse_ref, parse_version
from .store import Store


class PersonaGroup(click.Group):
    """Turns every PersonaError into a one-line message (click prints ``Error: ...``, exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PersonaError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; nothing was published") from None


def store_option(f):
    return click.option(
        "--store",
        "store_root",
        envvar="PERSONA_HOME",
        type=click.Path(file_okay=False),
        default=None,
        show_envvar=True,
        help="Store root folder. Default: ./adapters.",
    )(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)


def emit(as_json: bool, data: Any, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None:
        click.echo(text)


def _open(store_root: str | None) -> Store:
    return Store.open(store_root)


@click.group(cls=PersonaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="persona")
def main() -> None:
    """Per-user LoRA adapters around one frozen base model.

    \b
    Quick start:
      persona init                       bind ./adapters to the embedded base model
      persona create user:alice          publish user:alice@v1 (a fresh LoRA)
      persona show user:alice            versions, aliases, metrics
      persona verify                     re-hash every published file

    References are KIND:NAME[@vN|@alias], KIND in {user, domain, merged},
    NAME matching [a-z0-9][a-z0-9._-]{0,63}.
    """


@main.command()
@click.option("--base", default=EMBEDDED_BASE, show_default=True,
              help="Base model: the embedded smollm2-135m-instruct, a local model folder, or a cached Hugging Face id.")
@store_option
@json_option
def init(base: str, store_root: str | None, as_json: bool) -> None:
    """Create a store bound to one base model (its id and weight fingerprint)."""
    store = Store.init(store_root, base=base)
    cfg = store.config
    emit(as_json, {"store": str(store.root), "base": cfg.base_id, "fingerprint": cfg.base_fingerprint},
         f"store {store.root}\nbase  {cfg.base_id} ({cfg.base_fingerprint})")


@main.command()
@click.argument("ref")
@click.option("--rank", default=8, show_default=True, type=click.IntRange(1, 1024), help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scale = alpha / rank).")
@click.option("--dropout", default=0.05, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="LoRA dropout.")
@click.option("--targets", default=None, help="Comma-separated module names to adapt, e.g. q_proj,v_proj. Default: every linear layer of each block.")
@click.option("--init", "init_", type=click.Choice(["default", "random"]), default="default", show_default=True,
              help="default: B=0, the new adapter leaves the base's output unchanged.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initialisation.")
@store_option
@json_option
def create(ref, rank, alpha, dropout, targets, init_, seed, store_root, as_json) -> None:
    """Create adapter REF (e.g. user:alice) and publish its version v1."""
    settings = LoraSettings(
        rank=rank, alpha=alpha, dropout=dropout, init=init_, seed=seed,
        target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
    )
    info = _open(store_root).create(parse_ref(ref), settings)
    emit(as_json, info.to_dict(), f"created {info.adapter}@{info.label} (rank {rank}; adapts {', '.join(info.lora.get('target_modules') or [])})")


@main.command("list")
@click.option("--kind", type=click.Choice(["user", "domain", "merged"]), default=None, help="Only adapters of this kind.")
@store_option
@json_option
def list_(kind, store_root, as_json) -> None:
    """List the adapters in the store."""
    adapters = _open(store_root).list(kind)
    if as_json:
        emit(True, [{"adapter": a.adapter, "current": a.current, "versions": len(a.versions),
                     "aliases": dict(a.aliases), "pending": a.pending} for a in adapters])
        return
    if not adapters:
        click.echo("no adapters yet: create one with `persona create user:NAME`")
        return
    click.echo(f"{'ADAPTER':32} {'CURRENT':>8} {'VERSIONS':>8} {'PENDING':>8}")
    for a in adapters:
        cur = f"v{a.current}" if a.current else "-"
        click.echo(f"{a.adapter:32} {cur:>8} {len(a.versions):>8} {a.pending:>8}")


@main.command()
@click.argument("ref")
@store_option
@json_option
def show(ref, store_root, as_json) -> None:
    """Show an adapter's versions, aliases and metrics."""
    info = _open(store_root).show(parse_ref(ref))
    if as_json:
        emit(True, info.to_dict())
        return
    click.echo(f"{info.adapter}  current=v{info.current}  pending={info.pending}  replay={info.replay}")
    for v in info.versions:
        aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
        parent = f" parent=v{v.parent}" if v.parent else ""
        metrics = " ".join(f"{k}={_fmt(val)}" for k, val in sorted(v.metrics.items()) if not isinstance(val, (dict, list)))
        click.echo(f"  {v.label}{aliases}{parent}  {v.created}  {metrics}".rstrip())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@main.command()
@click.argument("ref")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--remove", is_flag=True, help="Remove alias NAME instead of setting it.")
@store_option
@json_option
def alias(ref, name, version, remove, store_root, as_json) -> None:
    """Point alias NAME of adapter REF at VERSION (e.g. `persona alias user:alice stable v3`)."""
    store = _open(store_root)
    if remove:
        store.remove_alias(parse_ref(ref), name)
        emit(as_json, {"adapter": parse_ref(ref).id, "alias": name, "removed": True}, f"removed alias {name}")
        return
    if version is None:
        raise click.UsageError("give the VERSION the alias should point at (e.g. v3), or --remove")
    store.set_alias(parse_ref(ref), name, version)
    number = parse_version(version)
    emit(as_json, {"adapter": parse_ref(ref).id, "alias": name, "version": number}, f"{parse_ref(ref).id}@{name} -> v{number}")


@main.command()
@click.argument("ref")
@click.argument("version")
@store_option
@json_option
def rollback(ref, version, store_root, as_json) -> None:
    """Move REF's current alias to VERSION (e.g. `persona rollback user:alice v2`)."""
    _open(store_root).rollback(parse_ref(ref), version)
    number = parse_version(version)
    emit(as_json, {"adapter": parse_ref(ref).id, "current": number}, f"{parse_ref(ref).id}@current -> v{number}")


@main.command()
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@store_option
@json_option
def delete(ref, yes, store_root, as_json) -> None:
    """Delete adapter REF: every version, its replay buffer and pending interactions."""
    parsed = parse_ref(ref)
    store = _open(store_root)
    info = store.show(parsed)
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(f"refusing to delete {parsed.id} without confirmation: pass --yes")
        click.confirm(f"delete {parsed.id} and all {len(info.versions)} versions?", abort=True)
    store.delete(parsed)
    emit(as_json, {"adapter": parsed.id, "deleted": True, "versions": len(info.versions)},
         f"deleted {parsed.id} ({len(info.versions)} versions)")


@main.command()
@click.argument("ref", required=False)
@store_option
@json_option
def verify(ref, store_root, as_json) -> None:
    """Re-hash every published file (of REF, or of the whole store); exit 1 on any mismatch."""
    report = _open(store_root).verify(parse_ref(ref) if ref else None)
    if as_json:
        emit(True, report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"PROBLEM {p}")
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"{status}: {report.adapters} adapters, {report.versions} versions, {report.files} files checked")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.option("--base", "base_id", default=None, help="Describe this base instead of the store's.")
@store_option
@json_option
def base(base_id, store_root, as_json) -> None:
    """Show the base model: id, local path, fingerprint, architecture."""
    if base_id is None:
        try:
            base_id = Store.open(store_root).config.base_id
        except StoreNotInitialized:
            base_id = EMBEDDED_BASE
    info = base_info(base_id)
    emit(as_json, info.to_dict(), "\n".join(f"{k:13} {v}" for k, v in info.to_dict().items()))


if __name__ == "__main__":  # pragma: no cover
    main()
