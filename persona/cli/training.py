"""CLI commands that train adapters: ``update``, ``log`` (queue interactions for the next update) and
``eval``."""

from __future__ import annotations

import math
import sys

import click

from ..refs import AdapterRef, parse_ref
from ..store.records import AUTO_UPDATE_ORIGIN
from ..training.config import HOLDOUT_MIN_ROWS, BulkConfig, UpdateConfig
from ._common import (check_placement, emit, field_values, json_option, open_store, options_from, placement_options,
                      store_option)


def _progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


def _install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: training stops, nothing is published, locks are released."""
    import signal

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


@click.command()
@click.argument("ref", required=False)
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="Interactions (JSON Lines). Default: the adapter's pending queue.")
@click.option("--all", "all_", is_flag=True, help="Update every adapter that has pending interactions (base loaded once).")
@options_from(UpdateConfig, {
    "epochs": "--epochs", "max_steps": "--max-steps", "learning_rate": "--lr", "batch_size": "--batch-size",
    "seed": "--seed", "holdout_fraction": "--holdout", "replay_fraction": "--replay", "reg": "--reg",
    "reg_strength": "--reg-strength", "max_forgetting": "--max-forgetting", "forgetting_floor": "--forgetting-floor",
    "max_length": "--max-length", "precision": "--precision", "force": "--force",
    "supersede": "--supersede/--no-supersede", "supersede_threshold": "--supersede-threshold",
    "replay_recency": "--replay-recency",
})
@options_from(BulkConfig, {"rows_per_step": "--rows-per-step", "tokens_per_step": "--tokens-per-step",
                           "max_adapters_per_step": "--max-adapters-per-step"})
@click.option("--exclude", "exclude", multiple=True, metavar="REF",
              help="With --all: leave adapter REF out of this run, its pending queue untouched (repeatable).")
@click.option("--min-pending", default=1, show_default=True, type=click.IntRange(1, 1 << 30), metavar="N",
              help="With --all: leave adapters with fewer pending rows for a later run, their queue untouched "
                   f"(`serve --auto-update` passes {HOLDOUT_MIN_ROWS}: fewer rows hold none out for the gate).")
@click.option("--origin", type=click.Choice([AUTO_UPDATE_ORIGIN]), hidden=True,
              help="Tag the published versions' meta.json with where they came from (set by `serve --auto-update`).")
@placement_options
@store_option
@json_option
@click.pass_context
def update(ctx, ref, data_file, all_, exclude, min_pending, origin, device, dtype, store_root, as_json, rows_per_step,
           tokens_per_step, max_adapters_per_step, **settings) -> None:
    """Train REF's current version on new interactions and publish the next version.

    \b
    The new version becomes `current` only if its held-out loss beats the parent's and its loss on
    the replay buffer rose by at most --max-forgetting (or --forgetting-floor); otherwise it is published as `candidate`
    and the reason is recorded (see `persona show REF`). Ctrl-C or SIGTERM publishes nothing.

    \b
    --all updates every adapter with pending rows, one after another by default;
    --rows-per-step N (e.g. 64, for GPUs) and/or --tokens-per-step N (padded tokens, which bound a
    step's memory) pack several adapters' training steps into shared batches
    (--max-adapters-per-step; each adapter still trains as it would alone). On a CPU
    that measured slower and larger (docs/BENCHMARKS.md). An adapter that fails is reported
    with its reason and the others publish; the exit status is then 1.
    --exclude REF leaves an adapter out (`serve --auto-update` passes the ones
    whose last update failed, until their pending data changes).

    \b
    Examples:
      persona update user:alice --data examples/interactions/alice.jsonl
      persona update user:alice                 (train on the pending queue of `persona log`)
      persona update --all --max-steps 50
      persona update --all --exclude user:bob   (everyone with pending rows but bob)
      persona update --all --device cuda        (the base in bfloat16; the LoRA factors train in float32)
    """
    from ..interactions import read_interactions
    from ..training.trainer import Trainer, UpdateFailure

    if exclude and not all_:
        raise click.UsageError("--exclude leaves adapters out of --all; with one REF, just run the one you mean")
    if bool(ref) == bool(all_):
        raise click.UsageError("give one adapter REF, or --all")
    if all_ and data_file:
        raise click.UsageError("--all trains each adapter on its own pending queue; --data does not apply")
    for name, flag in (("rows_per_step", "--rows-per-step"), ("tokens_per_step", "--tokens-per-step")):
        if not all_ and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"{flag} packs the adapters of --all; one REF trains alone")
    if not all_ and ctx.get_parameter_source("min_pending") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--min-pending applies to --all; one REF trains whatever it is given")
    excluded = [_excluded(r) for r in exclude]  # a bad reference stops here, before the base loads
    bulk = BulkConfig(rows_per_step=rows_per_step, tokens_per_step=tokens_per_step,
                      max_adapters_per_step=max_adapters_per_step)
    config = UpdateConfig(**field_values(UpdateConfig, settings))
    check_placement(device, dtype, training=True)
    store = open_store(store_root)
    for left in excluded:  # not an error: `serve --auto-update` may exclude an adapter deleted meanwhile
        if not store.exists(left):
            click.echo(f"note: --exclude {left.id}: no such adapter", err=True)
    parsed = parse_ref(ref) if ref else None
    if parsed is not None:
        store.show(parsed)  # fail fast, before loading the base
    interactions = read_interactions(data_file) if data_file else None  # validated before any training
    _install_sigterm()
    trainer = Trainer(store, device=device, dtype=dtype, origin=origin)
    results = trainer.update_all(config, bulk, progress=_progress(as_json), exclude=excluded,
                                 min_pending=min_pending) if all_ else [
        trainer.update(parsed, interactions, config, progress=_progress(as_json))
    ]
    failed = [r for r in results if isinstance(r, UpdateFailure)]
    if as_json:
        emit(True, [r.to_dict() for r in results] if all_ else results[0].to_dict())
    else:
        _print_updates(results, all_, left_out=bool(excluded) or min_pending > 1)
    if failed:
        ctx.exit(1)


def _excluded(text: str) -> AdapterRef:
    """An ``--exclude`` value: one adapter by name (a version or alias would suggest a version is left out)."""
    ref = parse_ref(text)
    if ref.version is not None or ref.alias is not None or ref.kind == "domain" and ref.name == "auto":
        raise click.BadParameter(f"{text!r}: name an adapter as KIND:NAME (a run updates whole adapters)",
                                 param_hint="'--exclude'")
    return ref.unpinned()


def _print_updates(results, all_: bool, *, left_out: bool = False) -> None:
    from ..training.trainer import UpdateFailure

    if all_ and not results:
        click.echo("no adapter to update: none has pending interactions, or --exclude/--min-pending left them out"
                   if left_out else "no adapter has pending interactions")
    for r in results:
        if isinstance(r, UpdateFailure):
            click.echo(f"{r.adapter}: FAILED, nothing published ({r.error}): {r.reason}")
            continue
        alias_name = "current" if r.promoted else "candidate"
        m = r.metrics
        click.echo(f"{r.adapter}: published {r.version.label} (parent v{r.parent}) as {alias_name}: {r.reason}")
        click.echo(f"  {m['steps']} steps on {m['train_examples']} examples (+{m['replay_examples']} in replay), "
                   f"{m['seconds']:.1f}s" + (f"; {m['truncated']} truncated" if m["truncated"] else ""))


@click.command()
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
    count = open_store(store_root).log(parse_ref(ref), interactions)
    pending = open_store(store_root).show(parse_ref(ref)).pending
    emit(as_json, {"adapter": parse_ref(ref).id, "logged": count, "pending": pending},
         f"logged {count} interactions for {parse_ref(ref).id} ({pending} pending)")


@click.command("eval")
@click.argument("ref")
@click.option("--data", "data_file", type=click.Path(dir_okay=False), help="Interactions (JSON Lines) to score.")
@click.option("--versions", default=None, help="Comma-separated versions or aliases to compare, e.g. v1,v3,base (base: no adapter).")
@click.option("--matrix", is_flag=True,
              help="Instead of --data: every version on every update's kept held-out slice, with BWT, FWT and gain.")
@options_from(UpdateConfig, {"max_length": "--max-length"})
@placement_options
@store_option
@json_option
def eval_(ref, data_file, versions, matrix, max_length, device, dtype, store_root, as_json) -> None:
    """Loss and perplexity of REF (or of several versions) on interactions, or REF's loss matrix.

    \b
    --matrix: R[i][j] = loss per target token of row i (the base, then each version
    up to the version F that REF names) on the held-out slice kept by update j (the
    columns; v_j is the version update j published; versions that kept none are
    listed as not kept). Lower is better.
      gain[j] = R[base][j] - R[v_j][j]       update j's gain over the base on its slice
      BWT = mean over j with v_j older than F of R[v_j][j] - R[F][j]
            (negative = F is worse on update j's slice than v_j was: forgetting)
      FWT = mean over j after the first of R[base][j] - R[parent(v_j)][j]
            (positive = the version update j started from already beat the base there)

    \b
    Examples:
      persona eval user:alice --data examples/interactions/alice-3.jsonl
      persona eval user:alice --data examples/interactions/alice-3.jsonl --versions v1,v2,base --json
      persona eval user:alice --matrix
      persona eval user:alice@v3 --matrix --json
    """
    from ..interactions import read_interactions
    from ..training.trainer import Trainer

    if matrix == bool(data_file):
        raise click.UsageError("give --data FILE to score interactions, or --matrix for the kept held-out slices")
    if matrix and versions:
        raise click.UsageError("--matrix scores every version up to REF; --versions does not apply")
    check_placement(device, dtype)
    interactions = read_interactions(data_file) if data_file else None
    store = open_store(store_root)
    parsed = parse_ref(ref)
    store.show(parsed)
    if matrix:
        _print_matrix(Trainer(store, device=device, dtype=dtype).loss_matrix(parsed, max_length=max_length), as_json)
        return
    selectors = [v.strip() for v in versions.split(",") if v.strip()] if versions else [parsed.selector]
    results = Trainer(store, device=device, dtype=dtype).evaluate(parsed, interactions, selectors, max_length=max_length)
    if as_json:
        emit(True, [r.to_dict() for r in results])
        return
    click.echo(f"{'VERSION':10} {'LOSS':>8} {'PPL':>10} {'TOKENS':>8}")
    for r in results:
        layer = f"  (over {r.over})" if r.over else ""
        click.echo(f"{r.version:10} {r.loss:8.4f} {r.perplexity:10.2f} {r.tokens:8d}{layer}")


def _print_matrix(m, as_json: bool) -> None:
    if as_json:
        emit(True, m.to_dict())
        return

    def num(v):
        return "-" if v is None or math.isnan(v) else f"{v:.4f}"  # NaN: a slice with no target token

    click.echo(f"{m.adapter} as of {m.final}: loss per token, rows = version, columns = update's held-out slice")
    if not m.columns:
        click.echo("no version up to it kept a held-out slice (updates keep one from this persona on)")
    else:
        click.echo(f"{'':10}" + "".join(f"{c:>10}" for c in m.columns))
        for row, values in zip(m.rows, m.losses):
            click.echo(f"{row:10}" + "".join(f"{num(v):>10}" for v in values))
        click.echo(f"{'gain':10}" + "".join(f"{num(v):>10}" for v in m.gain) + "   (base - own version)")
        click.echo(f"{'tokens':10}" + "".join(f"{t:>10}" for t in m.tokens))
    click.echo(f"BWT {num(m.bwt).strip()}  (negative = forgetting)   FWT {num(m.fwt).strip()}")
    if m.not_kept:
        click.echo(f"not kept: {', '.join(m.not_kept)}")


COMMANDS = [update, log, eval_]
