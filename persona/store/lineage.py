"""Lineage: which adapters were built from which (merge, ``--from``, ``--over``, parent version), the
rules it must obey (no user's data in a shared adapter or in another user's adapter), and deletion,
which refuses to orphan dependents unless asked to cascade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .._fs import remove_tree
from ..errors import (  # noqa: F401 - AdapterHasDependents importable from here as before
    AdapterHasDependents, AdapterNotFound, DamagedAdapter, InvalidConfig, InvalidName, InvalidReference, PersonaError,
    VersionNotFound,
)
from ..peft_format import ADAPTER_WEIGHTS
from ..refs import MAX_STACK, RESERVED_NAMES, AdapterRef, StackPart, format_stack, parse_ref, parse_stack
from .materialized import drop_built_from
from .records import lineage_sources

if TYPE_CHECKING:
    from .protocol import StoreView


_RELATIONS = {"merge": "merged from", "from": "started from", "over": "layered on"}


@dataclass(frozen=True)
class Dependent:
    """``adapter`` depends on ``on``: merged from it, started from it (``from``) or layered on it (``over``)."""

    adapter: str
    on: str
    relation: str

    def describe(self) -> str:
        return f"{_RELATIONS.get(self.relation, 'derived from')} {self.on}"


def dependents(store: StoreView, ref: str | AdapterRef) -> list[Dependent]:
    """Adapters that depend on ``ref``, directly or through each other, most derived first.

    A dependent names ``ref`` (any version) in the ``lineage`` of one of its versions (a merge,
    a ``--from`` copy) or is layered on it (``over``).
    """
    root = parse_ref(ref).id
    edges: dict[str, list[Dependent]] = {}  # adapter -> the adapters depending on it
    for adapter in store.list():
        for version in adapter.versions:
            sources = [(e.get("adapter"), e.get("relation") or "lineage") for e in version.lineage]
            if version.over:
                sources.append((version.over.get("adapter"), "over"))
            for source, relation in sources:
                if source and source != adapter.adapter:
                    edges.setdefault(source, []).append(Dependent(adapter.adapter, source, relation))
    order: list[Dependent] = []
    seen = {root}

    def visit(node: str) -> None:  # post-order: every adapter after all that depend on it
        for dep in edges.get(node, ()):
            if dep.adapter not in seen:
                seen.add(dep.adapter)
                visit(dep.adapter)
                order.append(dep)

    visit(root)
    return order


def user_ancestry(store: StoreView, sources: Sequence[tuple[AdapterRef, str]],
                  owner: str | None = None) -> list[str] | None:
    """A lineage path from one of ``sources`` (pinned versions) to a user adapter other than
    ``owner`` (an adapter id whose own versions are followed, not refused), else None.

    Follows every edge a version was built from: merge parents and ``--from`` sources (its
    lineage), the layer it sits on (``over``) and the version it was trained from (``parent``).
    A link that cannot be read (deleted, damaged) cannot be shown to be user-free: refused.
    """
    stack = [(ref, relation, [f"{ref} ({relation})"]) for ref, relation in sources]
    seen: set[AdapterRef] = set()
    while stack:
        ref, relation, path = stack.pop()
        if ref.kind == "user" and ref.id != owner:
            return path
        if ref in seen:
            continue
        seen.add(ref)
        try:
            info = store._read_meta(ref, ref.version)
        except (AdapterNotFound, VersionNotFound, DamagedAdapter, InvalidName) as exc:
            raise InvalidReference(f"cannot show that {ref} holds no user's data: {exc}".rstrip(".")) from None
        nxt = list(info.sources())
        if info.parent is not None:
            nxt.append((ref.at(info.parent), "parent"))
        stack += [(r, rel, path + [f"{r} ({rel})"]) for r, rel in nxt]
    return None


def check_shared_lineage(store: StoreView, ref: AdapterRef, lineage: Sequence[Mapping[str, Any]],
                         over: Mapping[str, Any] | None, parent: int | None = None) -> None:
    """A domain adapter reaches every user's token: refuse one built, by any path, from a user adapter.
    A user adapter reaches its user's token: refuse one built from another user's adapter, also
    through a merge (``merge user:alice … --into merged:m`` then ``create user:eve --from merged:m``)."""
    if ref.kind not in ("domain", "user"):
        return  # merged adapters are served to admin tokens only
    sources = lineage_sources(lineage, over)
    # A user's own earlier versions passed this check when they were published: only the new
    # edges need following (and a missing parent stays publish's VersionNotFound).
    if parent is not None and ref.kind == "domain":
        sources.append((ref.unpinned().at(parent), "parent"))
    owner = ref.id if ref.kind == "user" else None
    path = user_ancestry(store, sources, owner)
    if path and ref.kind == "domain":
        raise InvalidReference(
            f"{ref.id} is a shared domain adapter (every user's token reaches it) and cannot descend from a user "
            f"adapter: {ref.id} <- {' <- '.join(path)}. Build it from domain adapters only"
        )
    if path:
        raise InvalidReference(
            f"{ref.id} is reached by its user's token and cannot descend from another user's adapter: "
            f"{ref.id} <- {' <- '.join(path)}. Start it from domain adapters, or a merge of domain adapters"
        )


def layer_target(store: StoreView, ref: AdapterRef, over: str | AdapterRef) -> dict[str, Any]:
    """Pin the adapter ``ref`` will be layered on, checking the layering rules."""
    target = parse_ref(over)
    if ref.kind != "user":
        raise InvalidReference(f"only user adapters are layered (--over); {ref.id} is a {ref.kind} adapter")
    if target.kind == "user":
        raise InvalidReference(
            f"{ref.id} cannot be layered over another user's adapter ({target.id}); use a domain or merged adapter")
    info = store.version_info(target)  # only user adapters are layered, so the target is never layered itself
    return {"adapter": info.adapter, "version": info.version, "sha256": info.files.get(ADAPTER_WEIGHTS)}


def with_layers(store: StoreView, parts: Sequence[StackPart],
                layer_of: Callable[[AdapterRef], AdapterRef | None] | None = None) -> tuple[StackPart, ...]:
    """Pinned ``parts``, each layered adapter (``create --over``) followed by its layer, pinned at the
    version recorded when it was created (not the layer's moving ``current``): served as it was trained.

    The layered adapter and its layer are one unit: a part's weight scales both (the LoRA deltas
    add, so ``user:carol*0.5`` is ``(carol + finance@v1) * 0.5``). A stack that names the layer's
    adapter itself chooses its version and weight, and the layer is not added again; so this is
    idempotent and ``resolved`` computes the same row when sent back. Two parts layered on the
    same adapter that the stack does not name are refused (a stack applies an adapter once).
    ``layer_of(pinned)`` reads a version's layer (default: its meta; the engine passes a cached one).
    """
    layer_of = layer_of or (lambda pinned: store.version_info(pinned).over_ref)
    named = {p.ref.id for p in parts}
    carried: dict[str, AdapterRef] = {}
    out: list[StackPart] = []
    for part in parts:
        out.append(part)
        layer = layer_of(part.ref)
        if layer is None or layer.id in named:
            continue
        if layer.id in carried:
            raise InvalidReference(
                f"{carried[layer.id]} and {part.ref} are both layered on {layer.id}, and a stack applies an "
                f"adapter once: name {layer.id} in the stack (with a version, e.g. {layer}) to choose it"
            )
        carried[layer.id] = part.ref
        out.append(StackPart(store.resolve(layer), part.weight))  # a missing layer fails here, at pinning
    return tuple(out)


def pin_stack(store: StoreView, model: str) -> tuple[StackPart, ...]:
    """Pin a model string as the engine serves it, outside any engine (export, a vLLM resolver): every
    part at a version, followed by its layer (:func:`with_layers`), at most ``MAX_STACK`` adapters.
    ``domain:auto`` is refused: the router chooses it per prompt, inside an engine."""
    parts = parse_stack(model)
    for part in parts:
        if part.ref.kind == "domain" and part.ref.name in RESERVED_NAMES:
            raise InvalidReference(f"{part.ref.id} is chosen per prompt by the router, inside persona's engine or "
                                   "gateway; name the adapters instead")
    pinned = with_layers(store, [StackPart(store.resolve(p.ref), p.weight) for p in parts])
    if len(pinned) > MAX_STACK:
        raise InvalidConfig(f"{format_stack(parts)!r} runs as {len(pinned)} adapters with their layers; a stack "
                            f"holds at most {MAX_STACK}")
    return pinned


def delete(store: StoreView, ref: AdapterRef, *, cascade: bool) -> tuple[str, ...]:
    """Delete ``ref`` (and, with ``cascade``, its dependents, most derived first); revoke their tokens."""
    if (link := store._symlinked(ref)) is not None:
        with store.lock(ref):  # the link itself, never what it points to (often another adapter)
            link.unlink(missing_ok=True)
        return _revoke_tokens(store, (ref.id,))
    with store.lineage_lock(), store.lock(ref):
        path = store._require(ref)
        found = dependents(store, ref)
        if found and not cascade:
            listing = ", ".join(f"{d.adapter} ({d.describe()})" for d in found)
            raise AdapterHasDependents(
                f"{ref.id} has {len(found)} dependent adapter(s): {listing}. Delete them first, or "
                f"delete them too with `persona delete {ref.id} --cascade`",
                tuple(d.adapter for d in found),
            )
        doomed = [parse_ref(d.adapter) for d in found] + [ref]
        store._retire([(r, store.version_numbers(r)) for r in doomed])
        # Most derived first: a crash part-way leaves the source, never a merge whose source is gone.
        for dependent in found:
            with store.lock(dependent.adapter):
                remove_tree(store._adapter_dir(dependent.adapter))
        remove_tree(path)
        # Cached merges built from any of them hold their weights too (persona.store.materialized).
        drop_built_from(store, doomed)
    return _revoke_tokens(store, tuple(d.adapter for d in found) + (ref.id,))


def _revoke_tokens(store: StoreView, deleted: tuple[str, ...]) -> tuple[str, ...]:
    """Revoke the API tokens of deleted adapters (they name the user); returns ``deleted``."""
    for adapter in deleted:
        store.tokens.revoke_subject(adapter)
    return deleted
