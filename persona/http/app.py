"""The OpenAI-compatible HTTP server: ``persona serve``.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or SSE streaming),
``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /healthz`` (no auth), ``GET /metrics``
(Prometheus text format), and the dashboard under ``/ui`` (:mod:`persona.http.routes.ui`). What
the server does with each OpenAI request field (supported, refused with a 400 naming it, or ignored
by design) is the table in ``persona.http.openai_schema``.

``model`` names what serves the request: an adapter reference (``user:alice``, ``user:alice@v2``), a
stack (``user:alice+domain:finance``), weighted per part (``user:alice+domain:finance*0.5``), with
``domain:auto`` for the router's choice, or the base's name for no adapter. Responses echo ``model``
as sent. An unknown adapter, or a part of a stack the caller's token may not reach, is a 404 (the
same answer, so a token cannot probe for users); the server never falls back to the base model.
Concurrent requests are batched together across adapters by the engine's worker.

This module assembles the app: its :class:`~persona.http.state.ServerState`, the error handlers
(every library error through the one table in :mod:`persona.errors`), the routers and the
shutdown. Each request: :func:`~persona.http.auth.caller` authenticates once, the body is read
under the size cap and validated, then the route checks, admits and submits to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI

from .errors import ErrorGuard, install_error_handlers
from .routes import admin, completions, models, ui
from .schemas import MAX_N  # noqa: F401 - importable from here as before
from .state import MAX_BODY_BYTES, MAX_TOKENS_LIMIT, ServerConfig, ServerState  # noqa: F401 - as above
from .ui_pages import UiHeaders


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    updater = app.state.persona.updater
    if updater is not None:  # --auto-update: the scheduler thread lives as long as the app
        updater.start()
    try:
        yield
    finally:
        # After uvicorn's graceful drain (--drain-timeout): whatever is still in the engine stops at its next step.
        app.state.persona.gate.cancel_all()
        if updater is not None:  # SIGTERM to a running worker, then SIGKILL: off the event loop
            await asyncio.to_thread(updater.stop)


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app over an :class:`~persona.serving.engine.Engine` (which holds the store and the base)."""
    state = ServerState.over(engine, config or ServerConfig())
    # openapi_url=None: the schema is served by the admin router, behind authentication
    app = FastAPI(title="persona", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.persona = state
    app.state.gate = state.gate  # as before the split: tests and make_server read it here
    install_error_handlers(app)
    app.add_middleware(ErrorGuard, count=state.metrics.count)
    app.add_middleware(UiHeaders)  # outermost: the dashboard's headers on its errors too
    for router in (completions.router, models.router, admin.router, ui.router):
        app.include_router(router)
    return app


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
                log_level: str = "info", *, factory=create_app):
    """A ``uvicorn.Server`` for the app ``factory(engine, config)`` (the gateway's:
    ``factory=create_gateway_app`` over a ``Gateway``); on SIGTERM/SIGINT it stops taking connections, lets in-flight
    requests finish for ``config.drain_timeout_s`` seconds, then cancels them (their engine rows stop
    at the next decode step) and exits."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # At the deadline the engine rows stop, so every response still ends well-formed (a 503, or
            # an error event and [DONE]); uvicorn's own timeout, a little later, is the backstop.
            deadline = asyncio.get_running_loop().call_later(config.drain_timeout_s, app.state.gate.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    config = config or ServerConfig()
    app = factory(engine, config)
    return DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=config.drain_timeout_s + 2))


def serve(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process; the engine batches across requests)."""
    make_server(engine, host, port, config).run()
