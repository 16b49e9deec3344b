"""Adapter resolution: turn a request's model string into the pinned stack that will run.

``user:a+domain:b*0.5`` becomes ``(user:a@v3, domain:b@v1*0.5)``: every part pinned to a version
(``Store.resolve``), a layered adapter followed by its pinned layer, ``domain:auto`` replaced by the
router's choice for the prompt, and the depth checked against the stack and slot limits. The engine
calls this at admission; nothing here touches the model or the slots.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

from ..errors import InvalidConfig, InvalidReference, NoDomainToRoute
from ..refs import MAX_STACK, RESERVED_NAMES, AdapterRef, StackPart, format_stack, parse_stack
from ..store.lineage import with_layers

__all__ = ["LAYER_CACHE", "ModelResolver"]

LAYER_CACHE = 1 << 16  # pinned versions whose layer (or lack of one) admission remembers

# (prompt or messages, names not to pick) -> the router's choices, each with ``.ref`` and ``.weight``
RouteFn = Callable[[Any, Iterable[str]], Sequence[Any]]


class ModelResolver:
    """Pins model strings against ``store`` for an engine serving ``base_name``.

    ``max_resident`` bounds a stack's depth (its adapters must be resident at once); ``route_top_k``
    is how many domains ``domain:auto`` becomes; ``route(prompt, exclude)`` runs the router.
    Thread-safe: the layer cache has its own lock.
    """

    def __init__(self, store, *, base_name: str, max_resident: int, route_top_k: int, route: RouteFn):
        self.store = store
        self.base_name = base_name
        self.max_resident = max_resident
        self.route_top_k = route_top_k
        self._route = route
        self._layers: dict[str, AdapterRef | None] = {}  # pinned ref -> its layer (immutable, like the slots' keys)
        self._layers_lock = threading.Lock()

    def resolve(self, model: str) -> tuple[StackPart, ...]:
        """See :meth:`Engine.resolve`."""
        parts = self._parse(model)
        for part in parts:
            if is_auto(part.ref):
                raise InvalidReference(
                    f"{part.ref.id} is chosen per prompt by the router: send it in a request (generate, submit, HTTP), "
                    "or see the choice with `persona route PROMPT`"
                )
        return self._pin(parts)

    def check(self, model: str) -> tuple[StackPart, ...]:
        """See :meth:`Engine.check`."""
        parts = self._parse(model)
        fixed = tuple(p for p in parts if not is_auto(p.ref))
        if len(parts) > len(fixed):
            self._check_routed_depth(parts)
        pinned = self._pin(fixed)
        if len(parts) > len(fixed) and len(pinned) > len(fixed):  # layers made the fixed part deeper
            self._check_routed_depth(parts, fixed_depth=len(pinned))
        return pinned

    def for_prompt(self, model: str, prompt: Any) -> tuple[StackPart, ...]:
        """Pin a request's model. A ``domain:auto*W`` part becomes the router's ``route_top_k`` best
        domains for this prompt (never one the stack already names), each at W x its routing weight;
        at top-1 that is one domain at weight W, so the row computes exactly what that domain computes."""
        parts = self._parse(model)
        if not any(is_auto(p.ref) for p in parts):
            return self.resolve(model)
        fixed = self.check(model)  # pinned, layers included, depth checked
        named = {p.ref.id for p in parts} | {p.ref.id for p in fixed}  # never route to a layer already served
        choices = self._route(prompt, named)
        if not choices:
            raise NoDomainToRoute(
                f"domain:auto has no domain adapter left to pick: {model!r} already names every routable domain"
            )
        pinned: list[StackPart] = []
        ids = {p.ref.id for p in parts}
        fixed_parts = iter(p for p in fixed if p.ref.id in ids)  # the named parts, as pinned above (not their layers)
        for part in parts:
            if is_auto(part.ref):
                pinned.extend(StackPart(c.ref, part.weight * c.weight) for c in choices if part.weight * c.weight > 0)
            else:
                pinned.append(next(fixed_parts))
        return self._pin(pinned)

    def _parse(self, model: str) -> tuple[StackPart, ...]:
        return () if model == self.base_name else parse_stack(model)

    def _pin(self, parts: Sequence[StackPart]) -> tuple[StackPart, ...]:
        if len(parts) > self.max_resident:
            raise InvalidConfig(
                f"{format_stack(parts)!r} stacks {len(parts)} adapters but max_resident is {self.max_resident}"
            )
        pinned = self._with_layers([StackPart(self.store.resolve(p.ref), p.weight) for p in parts])
        limit = min(MAX_STACK, self.max_resident)
        if len(pinned) > limit:
            raise InvalidConfig(
                f"{format_stack(parts)!r} runs as {format_stack(pinned)!r} with the layers its adapters were "
                f"trained on: "
                f"{len(pinned)} adapters, but at most {limit} fit (a stack holds {MAX_STACK}, "
                f"max_resident is {self.max_resident})"
            )
        return pinned

    def _with_layers(self, parts: Sequence[StackPart]) -> tuple[StackPart, ...]:
        """Each layered adapter followed by its pinned layer (see :func:`persona.store.lineage.with_layers`)."""
        return with_layers(self.store, parts, self._layer_of)

    def _layer_of(self, pinned: AdapterRef) -> AdapterRef | None:
        """The layer a pinned version was trained on, read once per version: a version's meta never changes,
        and admission should not read it again for every request (it costs more than pinning)."""
        key = str(pinned)
        with self._layers_lock:
            if key in self._layers:
                return self._layers[key]
        layer = self.store.version_info(pinned).over_ref
        with self._layers_lock:
            if len(self._layers) >= LAYER_CACHE:
                self._layers.pop(next(iter(self._layers)))
            self._layers[key] = layer
        return layer

    def _check_routed_depth(self, parts: Sequence[StackPart], fixed_depth: int | None = None) -> None:
        """Refuse a stack with ``domain:auto`` that top-k routing could grow past the stack or slot limit.

        ``fixed_depth``: the pinned depth of the other parts, when layers make it more than they are."""
        depth = (len(parts) - 1 if fixed_depth is None else fixed_depth) + self.route_top_k
        limit = min(MAX_STACK, self.max_resident)
        if depth > limit:
            raise InvalidReference(
                f"{format_stack(parts)!r} with route_top_k={self.route_top_k} can become {depth} adapters; "
                f"at most {limit} fit (a stack holds {MAX_STACK}, max_resident is {self.max_resident}): "
                "lower the top-k or name fewer adapters"
            )


def is_auto(ref: AdapterRef) -> bool:
    """Whether ``ref`` is ``domain:auto`` (the router's choice), not an adapter of its own."""
    return ref.kind == "domain" and ref.name in RESERVED_NAMES
