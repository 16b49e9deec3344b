"""What the routes share: the server's settings (:class:`ServerConfig`) and one typed
:class:`ServerState` per app, kept at ``app.state.persona`` and handed to routes by :func:`server_state`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..store.tokens import TokenStore
from .admission import AdmissionGate
from .autoupdate import AutoUpdateCollector, AutoUpdater, AutoUpdateSettings
from .metrics import Metrics
from .report_view import ReportCache
from .sessions import SessionStore

MAX_TOKENS_LIMIT = 4096
MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any prompt the embedded base's context holds (issue 10)


@dataclass
class ServerConfig:
    """The server's limits and switches (``persona serve`` options)."""

    auth: bool = True
    log_interactions: bool = False
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_body_bytes: int = MAX_BODY_BYTES  # a larger body is a 413, refused before it is read
    max_queue: int = 64  # requests in the engine (running or waiting); one more is a 429 with Retry-After
    max_per_token: int = 8  # requests in the engine per token (not applied with auth off)
    retry_after_s: int = 1  # the Retry-After of a 429 or 503
    drain_timeout_s: float = 5.0  # on SIGTERM: how long in-flight requests may finish before they are cancelled
    auto_update: AutoUpdateSettings | None = None  # --auto-update: the learning loop (engine mode only)


@dataclass
class ServerState:
    """One app's engine, store, tokens, settings, admission gate and metrics; the dashboard's
    login sessions and rendered reports."""

    engine: Any  # persona.serving.engine.Engine, or the gateway (persona.http.gateway.Gateway): store, base_name, check
    config: ServerConfig
    tokens: TokenStore
    gate: AdmissionGate
    metrics: Metrics
    sessions: SessionStore = field(default_factory=SessionStore)
    reports: ReportCache = field(default_factory=ReportCache)
    updater: AutoUpdater | None = None  # started and stopped with the app (http/app.py's lifespan)
    _limiters: dict[str, Any] = field(default_factory=dict)
    _longest_token: int | None = None

    @classmethod
    def over(cls, engine, config: ServerConfig, *, engine_metrics: bool = True) -> "ServerState":
        """The state over ``engine`` (or the gateway, ``engine_metrics=False``: it has no engine totals)."""
        gate = AdmissionGate(config.max_queue, config.max_per_token)
        metrics = Metrics(engine if engine_metrics else None, gate)
        updater = None
        if config.auto_update is not None and engine_metrics:  # the gateway has no store to train (serve refuses it)
            updater = AutoUpdater(engine.store, config.auto_update)
            metrics.registry.register(AutoUpdateCollector(updater))
        return cls(engine=engine, config=config, tokens=engine.store.tokens, gate=gate, metrics=metrics, updater=updater)

    @property
    def store(self):
        return self.engine.store

    def limiter(self, name: str, tokens: int):
        """A named ``anyio.CapacityLimiter``, made on first use: a limiter belongs to the running event loop."""
        import anyio

        if name not in self._limiters:
            self._limiters[name] = anyio.CapacityLimiter(tokens)
        return self._limiters[name]

    def max_token_chars(self) -> int:
        """Characters of the vocabulary's longest token (read on first use)."""
        if self._longest_token is None:
            self._longest_token = max((len(t) for t in self.engine.tokenizer.get_vocab()), default=1)
        return self._longest_token


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.persona
