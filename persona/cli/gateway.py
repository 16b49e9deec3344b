"""``persona serve --upstream URL ...``: the options of gateway mode and starting it (persona.http.gateway)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import click

from ._common import open_store

F = TypeVar("F", bound=Callable[..., Any])


def upstream_options(f: F) -> F:
    """``--upstream`` (repeatable) and ``--upstream-key`` (or ``$PERSONA_UPSTREAM_API_KEY``)."""
    f = click.option("--upstream-key", envvar="PERSONA_UPSTREAM_API_KEY", show_envvar=True, default=None,
                     help="Bearer key the gateway sends to its upstreams (the client's token is never forwarded).")(f)
    return click.option("--upstream", multiple=True, metavar="URL",
                        help="Run as a gateway: forward each request to this OpenAI-compatible server "
                             "(http://HOST:PORT, repeat for several; adapters stick to one by rendezvous hashing, "
                             "failing over to the next when one refuses connections). --max-resident and "
                             "--max-batch then belong to the upstreams.")(f)


def run_gateway(store_root: str | None, host: str, port: int, config, upstreams: tuple[str, ...],
                upstream_key: str | None, route_top_k: int, *, device: str = "auto", dtype: str = "auto") -> None:
    """Serve the gateway until interrupted (no base model loaded unless domain:auto asks the router,
    which then loads it placed by ``device``/``dtype``)."""
    from ..http.app import make_server
    from ..http.gateway import Gateway, create_gateway_app
    from ..http.upstream import UpstreamSettings

    settings = UpstreamSettings(tuple(upstreams), api_key=upstream_key or None)
    gateway = Gateway(open_store(store_root), settings, route_top_k=route_top_k, device=device, dtype=dtype)
    click.echo(f"persona gateway on http://{host}:{port} -> {', '.join(settings.urls)}", err=True)
    make_server(gateway, host, port, config, factory=create_gateway_app).run()
