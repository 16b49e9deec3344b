"""The gateway's upstreams: which OpenAI-compatible server answers a request, and sending it there.

``persona serve --upstream URL [--upstream URL ...]`` forwards each request to one of a fleet of
servers (vLLM with persona's resolver plugin, or another ``persona serve``). Two decisions live here:

- **Which upstream.** Rendezvous (highest-random-weight) hashing on the adapter's id without its
  version: every upstream gets a score ``sha256(url, key)`` and the highest wins, so an adapter
  stays warm on one replica across its versions, every gateway process picks the same replica
  (sha256, not Python's salted ``hash()``), and adding or removing one of n upstreams moves only
  about 1/n of the adapters (:func:`rendezvous_order`).
- **When to try the next one.** Only when the request never reached a usable answer: the
  connection was refused, timed out, or broke before the upstream sent its status line. Nothing
  has been sent to the client then, so trying the next upstream in rendezvous order is safe. An
  upstream that answers, with any status, is the answer; once a stream has started it is never
  retried. An upstream that failed is tried last for ``cooldown_s`` seconds, so a dead replica
  does not cost every request a connect timeout.

The client's persona token never travels upstream: requests are built from scratch, with only the
gateway's own key (``--upstream-key`` / ``PERSONA_UPSTREAM_API_KEY``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Sequence

import httpx

from ..errors import InvalidConfig, UpstreamUnavailable

log = logging.getLogger("persona.http.app")

# Sent with every upstream request: this gateway's random id, so a gateway whose --upstream leads back to
# itself recognizes its own request (else each hop re-forwards until the per-token limit answers 429).
HOP_HEADER = "x-persona-gateway"

# Before the status line arrives these mean "this upstream did not take the request": try the next.
FAILOVER_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError,
                   httpx.ReadError, httpx.WriteError, httpx.WriteTimeout)


def normalize_url(url: str) -> str:
    """``http://host:8000/v1/`` -> ``http://host:8000``: the server's root (routes are appended as ``/v1/...``)."""
    text = url.strip().rstrip("/").removesuffix("/v1")
    try:
        parsed = httpx.URL(text) if text else None
    except httpx.InvalidURL:  # e.g. an unclosed IPv6 bracket
        parsed = None
    if (parsed is None or parsed.scheme not in ("http", "https") or not parsed.host or parsed.query
            or parsed.fragment or not 0 < (80 if parsed.port is None else parsed.port) < 65536):
        raise InvalidConfig(f"invalid upstream URL {url!r}: expected http(s)://HOST[:PORT][/v1], "
                            "for example http://10.0.0.5:8000")
    if parsed.userinfo:  # it would be logged, shown in /metrics and sent beside --upstream-key
        raise InvalidConfig("an upstream URL must not hold credentials (USER:PASSWORD@): give the upstream's key "
                            "with --upstream-key or PERSONA_UPSTREAM_API_KEY")
    return text


def rendezvous_score(upstream: str, key: str) -> int:
    """The upstream's weight for ``key``: the first 8 bytes of sha256 over both (stable across processes)."""
    digest = hashlib.sha256(f"{upstream}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous_order(key: str, upstreams: Sequence[str]) -> list[str]:
    """``upstreams`` best first for ``key`` (highest score first; ties, impossible in practice, by URL).

    >>> order = rendezvous_order("user:alice", ["http://a:8000", "http://b:8000"])
    >>> sorted(order) == ["http://a:8000", "http://b:8000"]
    True
    """
    return sorted(upstreams, key=lambda u: (-rendezvous_score(u, key), u))


@dataclass(frozen=True)
class UpstreamSettings:
    """How the gateway reaches its upstreams (``persona serve --upstream ...`` options)."""

    urls: tuple[str, ...]
    api_key: str | None = None  # sent as Authorization: Bearer; never the client's token
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # between two bytes of an answer (a long generation is one slow first byte)
    cooldown_s: float = 5.0  # how long an upstream that failed is tried last
    unload_interval_s: float = 10.0  # how often deleted adapters' names are unloaded upstream (0: never)

    def __post_init__(self) -> None:
        if not self.urls:
            raise InvalidConfig("the gateway needs at least one upstream URL (--upstream)")
        urls = tuple(normalize_url(u) for u in self.urls)
        if len(set(urls)) != len(urls):
            raise InvalidConfig(f"an upstream is named twice: {', '.join(self.urls)}")
        object.__setattr__(self, "urls", urls)
        for name in ("connect_timeout_s", "read_timeout_s", "cooldown_s", "unload_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidConfig(f"{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Forwarded:
    """An upstream's answer whose status line has arrived: the body is still to be read (or streamed)."""

    upstream: str
    response: httpx.Response
    tried: int  # upstreams tried before this one answered (0: the first choice)


class UpstreamPool:
    """The upstreams, one pooled ``httpx.AsyncClient`` over them, and the failover loop.

    ``on_attempt(upstream, outcome)`` (optional) counts each try: ``"ok"`` or ``"connect_error"``.
    """

    def __init__(self, settings: UpstreamSettings, *, on_attempt=None):
        self.settings = settings
        self._on_attempt = on_attempt or (lambda upstream, outcome: None)
        self._down_until: dict[str, float] = {}
        self._client: httpx.AsyncClient | None = None
        self.hop_id = secrets.token_hex(8)  # HOP_HEADER's value: this process, not a secret

    @property
    def urls(self) -> tuple[str, ...]:
        return self.settings.urls

    def client(self) -> httpx.AsyncClient:
        """The shared client (made on first use, inside the event loop that uses it)."""
        if self._client is None:
            s = self.settings
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            timeout = httpx.Timeout(connect=s.connect_timeout_s, read=s.read_timeout_s, write=s.connect_timeout_s,
                                    pool=s.connect_timeout_s)
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def order(self, key: str) -> list[str]:
        """Where a request keyed ``key`` goes, in order: rendezvous order, upstreams that failed lately last."""
        ranked = rendezvous_order(key, self.urls)
        now = time.monotonic()
        healthy = [u for u in ranked if self._down_until.get(u, 0.0) <= now]
        return healthy + [u for u in ranked if u not in healthy]

    async def send(self, key: str, path: str, payload: bytes) -> Forwarded:
        """POST ``payload`` (JSON) to ``path`` on the first upstream for ``key`` that answers; its
        response is open for streaming (close it). :class:`UpstreamUnavailable` when none answers."""
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", HOP_HEADER: self.hop_id}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        client = self.client()
        failures: list[str] = []
        for tried, upstream in enumerate(self.order(key)):
            request = client.build_request("POST", upstream + path, content=payload, headers=headers)
            try:
                response = await client.send(request, stream=True)
            except FAILOVER_ERRORS as exc:
                self._down_until[upstream] = time.monotonic() + self.settings.cooldown_s
                self._on_attempt(upstream, "connect_error")
                failures.append(f"{upstream}: {type(exc).__name__}")
                log.warning("upstream %s did not take the request (%s: %s); trying the next", upstream,
                            type(exc).__name__, exc)
                continue
            self._down_until.pop(upstream, None)
            self._on_attempt(upstream, "ok")
            return Forwarded(upstream, response, tried)
        raise UpstreamUnavailable(f"no upstream answered ({'; '.join(failures)})")
