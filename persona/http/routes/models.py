"""``GET /v1/models`` and ``GET /v1/models/{model}``: the base and the adapters the caller's token
may reach (what an adapter's current version runs, its layer included); any other is a 404, the
same as an unknown one."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends

from ..auth import Caller
from ..generation import not_found
from ..state import ServerState, server_state
from ...refs import parse_stack
from ...store.tokens import Scope

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


def _entry(model: str, created: int, current: str | None = None) -> dict:
    entry = {"id": model, "object": "model", "created": created, "owned_by": "persona"}
    if current is not None:
        entry["current_version"] = current
    return entry


def _reachable(adapter, scope: Scope | None) -> bool:
    """Whether ``scope`` may run what the adapter's current version runs: the adapter and, if it is
    layered, its layer."""
    layers = [v.over_ref for v in adapter.versions if v.version == adapter.current and v.over]
    return scope is None or scope.allows([*parse_stack(adapter.adapter), *layers])


def visible_adapters(adapters, scope: Scope | None) -> list:
    """The adapters (of ``store.list()``) that ``scope`` may use and that have something to serve:
    what ``/v1/models`` lists and the dashboard (``/ui``) shows."""
    # no readable version: nothing to serve (a symlinked folder, every version damaged)
    return [a for a in adapters if a.versions and _reachable(a, scope)]


@router.get("/v1/models")
async def models(state: State, scope: Caller):
    created = int(time.time())
    data = [_entry(state.engine.base_name, created)]
    for adapter in visible_adapters(state.store.list(), scope):
        data.append(_entry(adapter.adapter, created, adapter.current))
    state.metrics.requests.labels("/v1/models", "200").inc()
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}")
async def model_info(model: str, state: State, scope: Caller):
    created = int(time.time())
    if model == state.engine.base_name:
        state.metrics.requests.labels("/v1/models/{model}", "200").inc()
        return _entry(model, created)
    for adapter in state.store.list():
        if adapter.adapter == model and _reachable(adapter, scope):
            state.metrics.requests.labels("/v1/models/{model}", "200").inc()
            return _entry(adapter.adapter, created, adapter.current)
    raise not_found(model)
