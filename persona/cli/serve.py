"""CLI command that serves adapters over the OpenAI-compatible HTTP API: ``serve``."""

from __future__ import annotations

import click

from ._common import open_engine, placement_options, route_top_k_option, store_option
from .gateway import run_gateway, upstream_options

MAX_BODY_BYTES = 4 << 20  # persona.http.app.MAX_BODY_BYTES, without importing FastAPI for every command


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-resident", default=16, show_default=True, type=click.IntRange(1, 4096), help="Adapters held in engine slots at once.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256), help="Requests batched into one forward pass.")
@click.option("--max-batch-tokens", default=2048, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Continuous batching: prompt tokens joining plus rows decoding in one step (a longer prompt runs "
                   "as the only one joining its step).")
@click.option("--scheduler", type=click.Choice(["continuous", "static"]), default="continuous", show_default=True,
              help="continuous: requests join and leave the running batch at every decode step; static: each batch "
                   "runs to its end (kept for comparison, to be removed).")
@click.option("--no-auth", is_flag=True, help="Serve without tokens (local use only): every adapter is reachable by anyone.")
@click.option("--log-interactions", is_flag=True, help="Append completed chats to the user's pending queue for the next `persona update`.")
@click.option("--max-body-bytes", default=MAX_BODY_BYTES, show_default=True, type=click.IntRange(1024),
              help="Largest request body accepted; a larger one is refused (413) before it is read.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests in the engine at once (running or waiting); more get 429 with Retry-After.")
@click.option("--max-per-token", default=8, show_default=True, type=click.IntRange(1),
              help="Requests in the engine at once per token; more get 429 (not applied with --no-auth).")
@click.option("--drain-timeout", default=5.0, show_default=True, type=click.FloatRange(0, 3600),
              help="On SIGTERM or Ctrl-C: seconds in-flight requests may finish before they are cancelled.")
@route_top_k_option
@placement_options
@upstream_options
@store_option
def serve(host, port, max_resident, max_batch, max_batch_tokens, scheduler, no_auth, log_interactions, max_body_bytes, max_queue, max_per_token,
          drain_timeout, route_top_k, device, dtype, upstream, upstream_key, store_root) -> None:
    """Serve adapters over an OpenAI-compatible HTTP API.

    \b
    `model` in a request names an adapter (user:alice, user:alice@v2), a stack
    (user:alice+domain:finance), optionally weighted per part
    (user:alice+domain:finance*0.5), with domain:auto for the router's choice
    (--route-top-k domains), or the base's name. Clients authenticate with
    `Authorization: Bearer <token>` from `persona token create user:NAME` (or --admin);
    a user token reaches a stack only if it reaches every part.

    \b
    Limits (docs/SECURITY.md): bodies over --max-body-bytes get 413; past --max-queue
    requests in flight, or --max-per-token for one token, 429 with Retry-After; a client
    that disconnects stops its generation at the next token; SIGTERM drains for
    --drain-timeout seconds, then cancels what is left and exits.

    \b
    Gateway mode (--upstream URL, repeatable): the same front door (tokens,
    404s, grammar, domain:auto, /v1/models, metrics, --log-interactions), but
    each request runs on an OpenAI-compatible upstream (vLLM with persona's
    resolver plugin, or another persona serve) with `model` pinned
    (user:alice -> user:alice@v3). Adapters stick to one upstream (rendezvous
    hashing); a refused connection fails over to the next. No base model is
    loaded unless domain:auto is used. docs/SERVING.md, "The gateway".

    \b
    Examples:
      persona serve --port 8000
      persona serve --port 8000 --route-top-k 2 --log-interactions
      persona serve --device cuda --dtype bfloat16      (auto picks this where torch sees a GPU)
      PERSONA_UPSTREAM_API_KEY=... persona serve --port 8080 \\
          --upstream http://10.0.0.5:8000 --upstream http://10.0.0.6:8000
    """
    from ..http.app import ServerConfig, serve as run_server

    if no_auth:
        click.secho("WARNING: --no-auth: authentication is OFF. Anyone who can reach "
                    f"{host}:{port} can use every adapter, including every user's.", fg="red", bold=True, err=True)
    config = ServerConfig(auth=not no_auth, log_interactions=log_interactions, max_body_bytes=max_body_bytes,
                          max_queue=max_queue, max_per_token=max_per_token, drain_timeout_s=drain_timeout)
    if upstream:  # --device/--dtype place the base the router loads for domain:auto, if it is used
        return run_gateway(store_root, host, port, config, upstream, upstream_key, route_top_k, device=device, dtype=dtype)
    engine = open_engine(store_root, max_resident=max_resident, max_batch=max_batch, route_top_k=route_top_k,
                         device=device, dtype=dtype, scheduler=scheduler, max_batch_tokens=max_batch_tokens)
    try:
        run_server(engine, host, port, config)
    finally:
        engine.close(timeout=drain_timeout)


COMMANDS = [serve]
