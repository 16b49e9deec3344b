"""The ``persona`` command: a thin layer that parses, calls one library function, and prints.

Every command takes ``--store`` (default ``$PERSONA_HOME`` or ``./adapters``) and ``--json``.
Library errors become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

import click

from .. import __version__
from ..base import EMBEDDED_BASE, base_info
from ._common import JSON_FLAG, STORE_ROOT, to_cli_error
from ..errors import StoreNotInitialized
from ..peft_format import LoraSettings
from ..refs import parse_ref, parse_version
from ..store import Store, default_root

_ARGV = "persona.argv"


class PersonaGroup(click.Group):
    """Turns every failure into one line on stderr and a non-zero exit (see ``cli_errors``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.setdefault(_ARGV, list(args))  # the group's own parse: every argument, before the command's
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):  # a normal exit, or click's own "Aborted!"
            raise
        except (Exception, KeyboardInterrupt) as exc:
            # --json as the command parsed it; before its options were parsed, as it was typed
            as_json = ctx.meta.get(JSON_FLAG, "--json" in ctx.meta.get(_ARGV, ()))
            raise to_cli_error(exc, as_json, store_root=ctx.meta.get(STORE_ROOT)) from None


def _remember_store(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.meta[STORE_ROOT] = value or str(default_root())  # named by an error whose OSError names no file
    return value


def store_option(f):
    return click.option(
        "--store",
        "store_root",
        envvar="PERSONA_HOME",
        type=click.Path(file_okay=False),
        default=None,
        show_envvar=True,
        callback=_remember_store,
        help="Store root folder. Default: ./adapters.",
    )(f)


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.meta[JSON_FLAG] = value  # meta is shared with the group, which prints errors as JSON then
    return value


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                        help="Print machine-readable JSON on stdout (errors: {\"error\": {...}} on stderr).")(f)


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
    try:  # transformers' per-tensor loading bars are noise on a command line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@main.command()
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
@click.option("--over", default=None, metavar="REF",
              help="Layer the new user adapter on this domain/merged adapter (pinned at its current version): "
                   "updates train only the new adapter, inference applies both.")
@click.option("--from", "source", default=None, metavar="REF",
              help="Start from a copy of this adapter's weights (a warm start), recorded in the lineage.")
@store_option
@json_option
def create(ref, rank, alpha, dropout, targets, init_, seed, over, source, store_root, as_json) -> None:
    """Create adapter REF (e.g. user:alice) and publish its version v1.

    \b
    Examples:
      persona create user:alice
      persona create user:alice --over domain:finance
      persona create user:newbie --from merged:cohort-a
    """
    if source:  # a warm start copies the source's LoRA settings: an option that would be ignored is refused
        ctx = click.get_current_context()
        given = [f"--{name.rstrip('_')}" for name in ("rank", "alpha", "dropout", "targets", "init_", "seed")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--from copies {source}'s LoRA settings; {', '.join(given)} does not apply")
    settings = None if source else LoraSettings(
        rank=rank, alpha=alpha, dropout=dropout, init=init_, seed=seed,
        target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
    )
    info = _open(store_root).create(parse_ref(ref), settings, over=over, source=source)
    emit(as_json, info.to_dict(), f"created {info.adapter}@{info.label} (rank {info.lora.get('rank')}; "
                                  f"adapts {', '.join(info.lora.get('target_modules') or [])})")


@main.command("list")
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
    adapters = _open(store_root).list(kind)
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


@main.command()
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

    store, parsed = _open(store_root), parse_ref(ref)
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
    for problem in info.damaged:
        click.echo(f"  DAMAGED {problem}")
    for v in info.versions:
        aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
        parent = f" parent=v{v.parent}" if v.parent else ""
        click.echo(f"  {v.label}{aliases}{parent}  {v.created}")
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


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@main.command()
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
    """Move REF's current alias to VERSION.

    \b
    Examples:
      persona rollback user:alice v2
    """
    _open(store_root).rollback(parse_ref(ref), version)
    number = parse_version(version)
    emit(as_json, {"adapter": parse_ref(ref).id, "current": number}, f"{parse_ref(ref).id}@current -> v{number}")


@main.command()
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
    store = _open(store_root)
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


@main.command()
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


def _progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


def _install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: training stops, nothing is published, locks are released."""
    import signal

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


@main.command()
@click.argument("ref", required=False)
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="Interactions (JSON Lines). Default: the adapter's pending queue.")
@click.option("--all", "all_", is_flag=True, help="Update every adapter that has pending interactions (base loaded once).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many optimizer steps.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True, help="Held-out share of the new data.")
@click.option("--replay", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Rows replayed from the adapter's past interactions, added to each batch as a share of --batch-size.")
@click.option("--reg", type=click.Choice(["none", "l2", "ewc"]), default="none", show_default=True, help="Pull the weights toward the parent version (replay already guards against forgetting; see docs/TRAINING.md).")
@click.option("--reg-strength", type=click.FloatRange(0), default=0.1, show_default=True, help="Weight of the --reg pull.")
@click.option("--max-forgetting", type=click.FloatRange(0), default=0.05, show_default=True, help="Allowed relative rise of the replay loss for promotion.")
@click.option("--forgetting-floor", type=click.FloatRange(0, 10), default=None,
              help="Allowed absolute rise of the replay loss, nats per token (default 0.05; the larger of the two bounds applies).")
@click.option("--max-length", type=click.IntRange(8), default=512, show_default=True, help="Tokens per example (longer ones are truncated and counted).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Training compute: auto is bf16 autocast where the hardware has native bf16 (AVX512-BF16/AMX CPUs, "
                   "CUDA), else fp32. Weights, evaluation and serving stay fp32.")
@click.option("--force", is_flag=True, help="Make the new version current whatever the gate says.")
@click.option("--supersede/--no-supersede", default=True, show_default=True,
              help="Leave replay rows that the new data revises (same question, different answer) out of replay and the gate.")
@click.option("--supersede-threshold", type=click.FloatRange(-1, 1), default=None,
              help="Question score from which a revised row counts as the same question (default: see docs/TRAINING.md).")
@click.option("--replay-recency", type=click.FloatRange(1, 1000), default=1.0, show_default=True,
              help="Sampling weight of the newest replay row over the oldest (1: uniform).")
@store_option
@json_option
def update(ref, data_file, all_, epochs, max_steps, lr, batch_size, seed, holdout, replay, reg, reg_strength,
           max_forgetting, forgetting_floor, max_length, precision, force, supersede, supersede_threshold, replay_recency,
           store_root, as_json) -> None:
    """Train REF's current version on new interactions and publish the next version.

    \b
    The new version becomes `current` only if its held-out loss beats the parent's and its loss on
    the replay buffer rose by at most --max-forgetting (or --forgetting-floor); otherwise it is published as `candidate`
    and the reason is recorded (see `persona show REF`). Ctrl-C or SIGTERM publishes nothing.

    \b
    Examples:
      persona update user:alice --data examples/interactions/alice.jsonl
      persona update user:alice                 (train on the pending queue of `persona log`)
      persona update --all --max-steps 50
    """
    from ..interactions import read_interactions
    from ..training.trainer import Trainer, UpdateConfig

    if bool(ref) == bool(all_):
        raise click.UsageError("give one adapter REF, or --all")
    if all_ and data_file:
        raise click.UsageError("--all trains each adapter on its own pending queue; --data does not apply")
    config = UpdateConfig(
        epochs=epochs, max_steps=max_steps, learning_rate=lr, batch_size=batch_size, seed=seed,
        holdout_fraction=holdout, replay_fraction=replay, reg=reg, reg_strength=reg_strength,
        max_forgetting=max_forgetting, max_length=max_length, precision=precision, force=force,
        supersede=supersede, replay_recency=replay_recency,
        **({"supersede_threshold": supersede_threshold} if supersede_threshold is not None else {}),
        **({"forgetting_floor": forgetting_floor} if forgetting_floor is not None else {}),
    )
    store = _open(store_root)
    parsed = parse_ref(ref) if ref else None
    if parsed is not None:
        store.show(parsed)  # fail fast, before loading the base
    interactions = read_interactions(data_file) if data_file else None  # validated before any training
    _install_sigterm()
    trainer = Trainer(store)
    results = trainer.update_all(config, progress=_progress(as_json)) if all_ else [
        trainer.update(parsed, interactions, config, progress=_progress(as_json))
    ]
    if as_json:
        emit(True, [r.to_dict() for r in results] if all_ else results[0].to_dict())
        return
    if all_ and not results:
        click.echo("no adapter has pending interactions")
    for r in results:
        alias_name = "current" if r.promoted else "candidate"
        m = r.metrics
        click.echo(f"{r.adapter}: published {r.version.label} (parent v{r.parent}) as {alias_name}: {r.reason}")
        click.echo(f"  {m['steps']} steps on {m['train_examples']} examples (+{m['replay_examples']} in replay), "
                   f"{m['seconds']:.1f}s" + (f"; {m['truncated']} truncated" if m["truncated"] else ""))


@main.command()
@click.argument("ref")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False), help="Interactions (JSON Lines).")
@store_option
@json_option
def log(ref, data_file, store_root, as_json) -> None:
    """Append interactions to REF's pending queue, for the next `persona update REF`.

    \b
    Examples:
      persona log user:alice --data examples/interactions/alice-2.jsonl
    """
    from ..interactions import read_interactions

    interactions = read_interactions(data_file)
    count = _open(store_root).log(parse_ref(ref), interactions)
    pending = _open(store_root).show(parse_ref(ref)).pending
    emit(as_json, {"adapter": parse_ref(ref).id, "logged": count, "pending": pending},
         f"logged {count} interactions for {parse_ref(ref).id} ({pending} pending)")


@main.command("eval")
@click.argument("ref")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False), help="Interactions (JSON Lines).")
@click.option("--versions", default=None, help="Comma-separated versions or aliases to compare, e.g. v1,v3,base (base: no adapter).")
@click.option("--max-length", type=click.IntRange(8), default=512, show_default=True)
@store_option
@json_option
def eval_(ref, data_file, versions, max_length, store_root, as_json) -> None:
    """Loss and perplexity of REF (or of several versions) on interactions.

    \b
    Examples:
      persona eval user:alice --data examples/interactions/alice-3.jsonl
      persona eval user:alice --data examples/interactions/alice-3.jsonl --versions v1,v2,base --json
    """
    from ..interactions import read_interactions
    from ..training.trainer import Trainer

    interactions = read_interactions(data_file)
    store = _open(store_root)
    parsed = parse_ref(ref)
    store.show(parsed)
    selectors = [v.strip() for v in versions.split(",") if v.strip()] if versions else [parsed.selector]
    results = Trainer(store).evaluate(parsed, interactions, selectors, max_length=max_length)
    if as_json:
        emit(True, [r.to_dict() for r in results])
        return
    click.echo(f"{'VERSION':10} {'LOSS':>8} {'PPL':>10} {'TOKENS':>8}")
    for r in results:
        layer = f"  (over {r.over})" if r.over else ""
        click.echo(f"{r.version:10} {r.loss:8.4f} {r.perplexity:10.2f} {r.tokens:8d}{layer}")


@main.command()
@click.option("--base", "base_id", default=None, help="Describe this base instead of the store's.")
@store_option
@json_option
def base(base_id, store_root, as_json) -> None:
    """Show the base model: id, local path, fingerprint, architecture.

    \b
    Examples:
      persona base
      persona base --base smollm2-135m-instruct --json
    """
    if base_id is None:
        try:
            base_id = Store.open(store_root).config.base_id
        except StoreNotInitialized:
            base_id = EMBEDDED_BASE
    info = base_info(base_id)
    emit(as_json, info.to_dict(), "\n".join(f"{k:13} {v}" for k, v in info.to_dict().items()))


def _register() -> None:
    from .compose import COMMANDS as compose_commands
    from .serve import COMMANDS as serve_commands

    for command in serve_commands + compose_commands:
        main.add_command(command)


_register()
