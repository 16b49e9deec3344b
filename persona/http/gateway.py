"""The gateway: ``persona serve --upstream URL [--upstream URL ...]``.

The same front door as the engine's server (scoped tokens, 404 for what a token may not reach, the
reference grammar, ``domain:auto``, ``/v1/models`` per token, ``/metrics``, interaction logging),
but instead of running the engine, each completion is forwarded to an OpenAI-compatible upstream
(vLLM with persona's resolver plugin, or another ``persona serve``) with ``model`` rewritten to the
pinned name: ``user:alice`` goes upstream as ``user:alice@v3``, a layered adapter or a stack as its
pinned stack (``user:carol@v1+domain:finance@v1``), ``domain:auto`` as the router's choice. The
pinning is the engine's own (:class:`~persona.serving.resolve.ModelResolver`), so the gateway and
the engine agree on what a name runs, and a new ``current`` is picked up by the next request.

No base model is loaded to start: the gateway needs the store only. The base is loaded (once,
frozen) the first time ``domain:auto`` asks the router, whose centroids are the base's hidden states.

>>> gateway = Gateway(Store.open(), UpstreamSettings(("http://10.0.0.5:8000",)))   # doctest: +SKIP
>>> make_gateway_server(gateway, port=8080).run()                                  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from fastapi import FastAPI

from ..refs import MAX_STACK, StackPart, format_stack
from ..serving.resolve import ModelResolver
from .errors import ErrorGuard, install_error_handlers
from .state import ServerConfig, ServerState
from .unload import SentNames, Unloaded, unload_headers
from .upstream import UpstreamPool, UpstreamSettings


class Gateway:
    """What the gateway's routes need from the library: the store, the base's name, pinning (and
    the router, loaded on first use), and the pool of upstreams.

    ``route_top_k`` is how many domains ``domain:auto`` becomes, as for the engine; ``device`` and
    ``dtype`` place the base the router loads (:func:`persona.base.resolve_device`). Thread-safe:
    pinning runs in worker threads; the router is built once under a lock.
    """

    def __init__(self, store, settings: UpstreamSettings, *, route_top_k: int = 1, device: str = "auto",
                 dtype: str = "auto"):
        self.store = store
        self.device, self.dtype = device, dtype
        self.base_name = store.config.base_id  # what the engine calls the base (BaseInfo.id), without loading it
        self.route_top_k = route_top_k
        self.pool = UpstreamPool(settings, on_attempt=self._count_attempt)
        self._router: Any = None
        self._router_lock = threading.Lock()
        # The upstream's limits decide how deep a stack may run; the grammar's limit is the gateway's.
        self._resolver = ModelResolver(store, base_name=self.base_name, max_resident=MAX_STACK,
                                       route_top_k=route_top_k, route=self._route_prompt)
        self.attempts = None  # a prometheus Counter, set by the app (upstream, outcome)
        self.unloads = None  # a prometheus Counter, set by the app (upstream, outcome)
        # the pinned names sent upstream, unloaded there once their adapter is deleted
        self.sent = SentNames(store, interval_s=settings.unload_interval_s, on_unload=self._count_unload)

    @property
    def router_loaded(self) -> bool:
        """Whether the base (for the router) has been loaded: only after a ``domain:auto`` request."""
        return self._router is not None

    def check(self, model: str) -> tuple[StackPart, ...]:
        """Pin every part but ``domain:auto`` (what :func:`persona.http.generation.check_model` calls)."""
        return self._resolver.check(model)

    def pin(self, model: str, prompt: Any) -> tuple[StackPart, ...]:
        """The pinned stack that runs ``model`` for ``prompt`` (``domain:auto`` routed); ``()`` for the base."""
        return self._resolver.for_prompt(model, prompt)

    def upstream_model(self, pinned: tuple[StackPart, ...]) -> str:
        """The name sent upstream: the pinned stack, or the base's name for no adapter."""
        return format_stack(pinned) if pinned else self.base_name

    def affinity_key(self, pinned: tuple[StackPart, ...]) -> str:
        """What picks the upstream: the adapters' ids without versions or weights (so a user's
        adapter stays on one replica across its versions), or the base's name."""
        return "+".join(p.ref.id for p in pinned) if pinned else self.base_name

    def _route_prompt(self, prompt: Any, exclude: Any) -> Any:
        with self._router_lock:  # one forward of the base at a time, and the base loaded once
            if self._router is None:
                from ..compose.route import Router

                # loads the base frozen and checks its fingerprint
                self._router = Router.load(self.store, device=self.device, dtype=self.dtype)
            return self._router.route(prompt, top_k=self.route_top_k, exclude=exclude)

    def _count_attempt(self, upstream: str, outcome: str) -> None:
        if self.attempts is not None:
            self.attempts.labels(upstream, outcome).inc()

    def _count_unload(self, result: Unloaded) -> None:
        if self.unloads is not None:
            self.unloads.labels(result.upstream, result.outcome).inc()


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    gateway: Gateway = app.state.persona.engine
    sweeper = None
    if gateway.sent.interval_s > 0:
        sweeper = asyncio.create_task(gateway.sent.run(gateway.pool.client,
                                                       unload_headers(gateway.pool.settings.api_key)))
    try:
        yield
    finally:
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        await gateway.pool.aclose()


def create_gateway_app(gateway: Gateway, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app of the gateway: the server's front door over :class:`Gateway`'s upstreams."""
    from prometheus_client import Counter

    from .routes import admin, forward, models

    state = ServerState.over(gateway, config or ServerConfig(), engine_metrics=False)
    gateway.attempts = Counter("persona_upstream_attempts", "Requests sent to each upstream, by outcome "
                               "(ok: it answered; connect_error: it did not, the next was tried)",
                               ["upstream", "outcome"], registry=state.metrics.registry)
    gateway.unloads = Counter("persona_upstream_unloads", "Deleted adapters' names unloaded from an upstream, by "
                              "outcome (unloaded; not_held: the upstream did not hold it; failed: tried again later)",
                              ["upstream", "outcome"], registry=state.metrics.registry)
    app = FastAPI(title="persona gateway", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan)
    app.state.persona = state
    app.state.gate = state.gate
    install_error_handlers(app)
    app.add_middleware(ErrorGuard, count=state.metrics.count)
    for router in (forward.router, models.router, admin.router):
        app.include_router(router)
    return app
