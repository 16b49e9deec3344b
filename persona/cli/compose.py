"""CLI commands that compose adapters: ``merge`` and ``route``."""

from __future__ import annotations

import click

from ..compose.merge import METHODS
from ._common import emit, json_option, open_store, placement_options, store_option


def _weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, one per parent, e.g. 0.7,0.3") from None


@click.command()
@click.argument("parents", nargs=-1, required=True, metavar="REF REF...")
@click.option("--into", required=True, help="The merged adapter to publish, merged:NAME (created, or its next version).")
@click.option("--method", type=click.Choice(METHODS), required=True,
              help="cat: exact (equals the stacked parents); svd: re-rank to --rank; linear: factor average; "
                   "ties, dare_linear, dare_ties: prune to --density.")
@click.option("--weights", callback=_weights, default=None, help="Comma-separated weight per parent, in order. Default: 1 each.")
@click.option("--density", type=float, default=None, help="Share of entries kept, in (0, 1]: ties, dare_linear, dare_ties.")
@click.option("--rank", type=click.IntRange(1), default=None, help="Rank of the result: svd only (default: the largest parent rank).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drops.")
@store_option
@json_option
def merge(parents, into, method, weights, density, rank, seed, store_root, as_json) -> None:
    """Merge adapters REF REF... into a new version of merged:NAME.

    The new version's lineage names each parent's version and sha256 (see `persona show`).

    \b
    Examples:
      persona merge user:alice domain:finance --into merged:alice-fin --method cat --weights 1,0.5
      persona merge domain:a domain:b --into merged:ab --method ties --density 0.5
    """
    from ..compose.merge import merge as merge_adapters

    info = merge_adapters(open_store(store_root), list(parents), into, method, weights, density, rank, seed=seed)
    parts = " + ".join(f"{e['adapter']}@v{e['version']} (w={e['weight']:g})" for e in info.lineage)
    emit(as_json, info.to_dict(),
         f"merged {parts} -> {info.adapter}@{info.label} ({method}, rank {info.lora.get('rank')})")


@click.command()
@click.argument("prompt")
@click.option("--top-k", type=click.IntRange(1), default=1, show_default=True,
              help="How many domain adapters to pick (what `serve`/`generate --route-top-k` does).")
@click.option("--method", type=click.Choice(["centroid", "arrow"]), default="centroid", show_default=True,
              help="centroid: the base's embedding of each domain's training prompts; arrow: each adapter's weights.")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.1, show_default=True,
              help="Softmax temperature of the weights over the top-k scores.")
@placement_options
@store_option
@json_option
def route(prompt, top_k, method, temperature, device, dtype, store_root, as_json) -> None:
    """Show which domain adapters `domain:auto` picks for PROMPT, their weights, and every domain's score.

    \b
    Weights are a softmax of the top-k scores / --temperature, summing to 1
    (top-1: weight 1). "stack" is the weighted stack domain:auto becomes; a
    weight on the auto part (domain:auto*0.5) multiplies these weights.

    \b
    Examples:
      persona route "How do index funds work?"
      persona route "How do index funds work?" --top-k 2 --json
    """
    from ..refs import StackPart, format_stack
    from ..compose.route import Router, select

    router = Router.load(open_store(store_root), device=device, dtype=dtype, method=method, temperature=temperature)
    scores = router.scores(prompt)
    choices = select(scores, top_k, temperature)
    data = {
        "method": method,
        "choices": [c.to_dict() for c in choices],
        "stack": format_stack([StackPart(c.ref, c.weight) for c in choices]),
        "scores": [s.to_dict() for s in scores],
        "skipped": router.skipped,
    }
    if as_json:
        emit(True, data)
        return
    click.echo("route: " + " + ".join(f"{c.adapter} (weight {c.weight:.3f})" for c in choices))
    click.echo(f"stack: {data['stack']}")
    click.echo(f"scores ({method}):")
    for s in scores:
        click.echo(f"  {s.adapter:40} {s.score:+.4f}")
    for domain, why in sorted(router.skipped.items()):
        click.echo(f"  domain:{domain:33} skipped: {why}")


COMMANDS = [merge, route]
