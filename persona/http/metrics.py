"""The server's Prometheus metrics: request counts by route template and status, latency, tokens,
and the engine's totals read at scrape time.

Labels are route templates (``/v1/models/{model:path}``) or ``unmatched``, never raw paths, so the
label set stays fixed whatever paths clients send (issue 10: 20,000 random paths grew /metrics to
425 MB, and a raw path showed every token holder which adapter names others had probed).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.routing import Match

from .admission import AdmissionGate


def route_label(scope) -> str:
    """The route template a request matched (``/v1/models``), or ``unmatched``."""
    matched = scope.get("route")  # set by the router once a route matched (or matched but for the method)
    if matched is not None:
        return getattr(matched, "path", "unmatched")
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):  # before routing: the guard's 500
        path = getattr(route, "path", None)
        if path is not None and route.matches(scope)[0] != Match.NONE:
            return path
    return "unmatched"


class Metrics:
    """The counters one app exports at ``GET /metrics`` (a registry of its own, not the global one)."""

    def __init__(self, engine, gate: AdmissionGate):
        """``engine`` None (the gateway): no engine totals, only the requests in flight."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("persona_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.tokens = Counter("persona_tokens", "Tokens processed", ["kind"], registry=self.registry)
        self.latency = Histogram("persona_request_seconds", "Request latency (completion routes)", ["route"],
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.registry.register(_EngineCollector(engine, gate))  # engine totals are read at scrape time, as counters

    def count(self, scope, status: int | str) -> None:
        """One answered request, labelled by the route it matched."""
        self.requests.labels(route_label(scope), str(status)).inc()

    def record(self, route: str, status: str, started: float, result: Any = None) -> None:
        """A completion route's answer: its status, latency and (when it finished) its token counts."""
        self.requests.labels(route, status).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)
        if result is not None:
            self.tokens.labels("prompt").inc(result.prompt_tokens)
            self.tokens.labels("completion").inc(result.completion_tokens)

    def exposition(self) -> tuple[str, str]:
        """The text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry).decode(), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Engine totals as Prometheus counters (monotonic since start), residency and load as gauges."""

    def __init__(self, engine, gate: AdmissionGate):
        self.engine, self.gate = engine, gate

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("persona_requests_in_flight", "Requests admitted (to the engine, or the gateway's "
                                "upstreams) and not finished", value=self.gate.in_flight)
        if self.engine is None:
            return
        stats = self.engine.stats()
        yield GaugeMetricFamily("persona_resident_adapters", "Adapters resident in engine slots", value=len(stats.resident))
        yield CounterMetricFamily("persona_adapter_loads", "Adapter loads from disk since start", value=stats.loads)
        yield CounterMetricFamily("persona_adapter_evictions", "Adapter slot evictions since start", value=stats.evictions)
        yield CounterMetricFamily("persona_adapter_cpu_hits", "Adapter loads served by the CPU tier", value=stats.cpu_hits)
        yield CounterMetricFamily("persona_requests_cancelled", "Requests cancelled in the engine (client gone, shutdown)",
                                  value=stats.cancelled)
