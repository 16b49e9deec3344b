"""CLI command that serves adapters over the OpenAI-compatible HTTP API: ``serve``."""

from __future__ import annotations

import shlex

import click

from ..errors import InvalidConfig
from ..http.update_policy import GRAMMAR, UpdatePolicy, parse_policy
from ._common import open_engine, placement_options, route_top_k_option, store_option
from .gateway import run_gateway, upstream_options
from .generate import memory_options, memory_setting

MAX_BODY_BYTES = 4 << 20  # persona.http.app.MAX_BODY_BYTES, without importing FastAPI for every command
# Options of `persona update` the auto-update worker is given by the server (AutoUpdateSettings.command);
# --auto-update-args may not give them.
RESERVED_UPDATE_ARGS = ("--all", "--json", "--data", "--store", "--origin")


class PolicyType(click.ParamType):
    """``--auto-update``'s value, parsed by :func:`persona.http.update_policy.parse_policy` (exit 2 when bad)."""

    name = "POLICY"

    def convert(self, value, param, ctx) -> UpdatePolicy:
        if isinstance(value, UpdatePolicy):
            return value
        try:
            return parse_policy(value)
        except InvalidConfig as exc:
            self.fail(str(exc).removeprefix("--auto-update: "), param, ctx)


def auto_update_options(f):
    """``--auto-update POLICY``, ``--auto-update-args``, ``--auto-update-interval``."""
    f = click.option("--auto-update-interval", default=10.0, show_default=True, type=click.FloatRange(0.1, 3600),
                     help="Seconds between checks of the --auto-update policy.")(f)
    f = click.option("--auto-update-args", default="", metavar="OPTIONS",
                     help="More `persona update` options for the auto-update worker, as one string "
                          "(e.g. '--epochs 1 --max-steps 50'); checked at start.")(f)
    return click.option("--auto-update", "auto_update", type=PolicyType(), default=None,
                        help=f"Learn while serving (needs --log-interactions): run `persona update --all` in a worker "
                             f"process when the policy says so. POLICY: {GRAMMAR}. docs/SERVING.md, "
                             f"\"Learning while serving\".")(f)


def check_update_args(text: str, dtype: str) -> tuple[str, ...]:
    """``--auto-update-args`` split like a shell and parsed by ``persona update`` itself now, so a typo stops
    the server from starting (exit 2) instead of failing every run later."""
    from .training import update

    try:
        args = tuple(shlex.split(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--auto-update-args'") from None
    for arg in args:
        if arg.split("=", 1)[0] in RESERVED_UPDATE_ARGS:
            raise click.BadParameter(f"{arg.split('=', 1)[0]} is set by the server ({' '.join(RESERVED_UPDATE_ARGS)})",
                                     param_hint="'--auto-update-args'")
    if any(arg in ("--help", "-h") for arg in args):
        raise click.BadParameter("--help is not an update option here", param_hint="'--auto-update-args'")
    try:
        parsed = update.make_context("update", ["--all", *args]).params
    except click.ClickException as exc:
        raise click.BadParameter(exc.format_message(), param_hint="'--auto-update-args'") from None
    if parsed.get("ref"):
        raise click.BadParameter(f"unexpected argument {parsed['ref']!r}: the worker updates every adapter with "
                                 "pending rows", param_hint="'--auto-update-args'")
    own_dtype = any(arg.split("=", 1)[0] == "--dtype" for arg in args)  # given last, it wins over the server's
    if (parsed.get("dtype") if own_dtype else dtype) == "float16":
        raise click.BadParameter("the server runs in float16, which training refuses; give the worker "
                                 "--auto-update-args '--dtype bfloat16' (or float32)",
                                 param_hint="'--auto-update-args'")
    return args


def min_pending_of(update_args: tuple[str, ...]) -> dict[str, int]:
    """``{"min_pending": N}`` when ``--auto-update-args`` sets ``--min-pending N`` (checked already), else {}."""
    from .training import update

    if not any(arg.split("=", 1)[0] == "--min-pending" for arg in update_args):
        return {}
    return {"min_pending": update.make_context("update", ["--all", *update_args]).params["min_pending"]}


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-resident", default=16, show_default=True, type=click.IntRange(1, 4096), help="Adapters held in engine slots at once.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Rows decoded at once (continuous batching); more requests wait for a free row. Raise it under "
                   "load: a row costs its KV cache, a request waiting for a row waits for its first token "
                   "(docs/BENCHMARKS.md).")
@click.option("--max-batch-tokens", default=2048, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Continuous batching: prompt tokens prefilled in one step (a longer prompt joins alone and is "
                   "prefilled in chunks of this size, the running rows decoding between them).")
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
@auto_update_options
@route_top_k_option
@memory_options
@placement_options
@upstream_options
@store_option
def serve(host, port, max_resident, max_batch, max_batch_tokens, no_auth, log_interactions, max_body_bytes,
          max_queue, max_per_token, drain_timeout, auto_update, auto_update_args, auto_update_interval, route_top_k,
          use_memory, k, max_tokens, retrieval, device, dtype, upstream, upstream_key, store_root) -> None:
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
    Memory (docs/MEMORY.md): with --memory, chat requests get the best entries of
    their user adapter's memory in a system message unless the body says
    "memory": false; without it, a body opts in with "memory": true.

    \b
    Gateway mode (--upstream URL, repeatable): the same front door (tokens,
    404s, grammar, domain:auto, /v1/models, metrics, --log-interactions), but
    each request runs on an OpenAI-compatible upstream (vLLM with persona's
    resolver plugin, or another persona serve) with `model` pinned
    (user:alice -> user:alice@v3). Adapters stick to one upstream (rendezvous
    hashing); a refused connection fails over to the next. No base model is
    loaded unless domain:auto is used. docs/SERVING.md, "The gateway".

    \b
    Learning while serving (--log-interactions --auto-update POLICY): logged chats
    queue up per user; when the policy says so (pending>=32: an adapter has 32
    pending rows; every=1h; quiet=22:00-06:00: no run starts then) one worker
    process runs `persona update --all` over the same store while serving goes on,
    and the next request uses each promoted version. An adapter whose update
    fails is left out of later runs until a chat is logged to it (or a new
    version of it is published); the others go on. `persona show` marks the
    loop's versions "auto-update"; /metrics counts runs, updates and left-out adapters.

    \b
    Examples:
      persona serve --port 8000
      persona serve --port 8000 --route-top-k 2 --log-interactions
      persona serve --log-interactions --auto-update 'pending>=32,every=1h,quiet=22:00-06:00'
      persona serve --port 8000 --log-interactions --memory --memory-k 4
      persona serve --device cuda --dtype bfloat16      (auto picks this where torch sees a GPU)
      PERSONA_UPSTREAM_API_KEY=... persona serve --port 8080 \\
          --upstream http://10.0.0.5:8000 --upstream http://10.0.0.6:8000
    """
    from ..http.app import ServerConfig, serve as run_server

    if auto_update is None and auto_update_args:
        raise click.UsageError("--auto-update-args needs --auto-update POLICY")
    if auto_update is not None and not log_interactions:
        raise click.UsageError("--auto-update learns from logged chats: add --log-interactions")
    if auto_update is not None and upstream:
        raise click.UsageError("--auto-update needs the engine: a gateway (--upstream) serves no weights to update; "
                               "run the auto-update on an engine server, or `persona update --all` on a schedule")
    update_args = check_update_args(auto_update_args, dtype) if auto_update is not None else ()
    if no_auth:
        click.secho("WARNING: --no-auth: authentication is OFF. Anyone who can reach "
                    f"{host}:{port} can use every adapter, including every user's.", fg="red", bold=True, err=True)
    config = ServerConfig(auth=not no_auth, log_interactions=log_interactions, max_body_bytes=max_body_bytes,
                          max_queue=max_queue, max_per_token=max_per_token, drain_timeout_s=drain_timeout)
    if upstream and use_memory:
        raise click.UsageError("--memory applies where prompts are built: pass it to the upstream persona servers")
    if upstream:  # --device/--dtype place the base the router loads for domain:auto, if it is used
        return run_gateway(store_root, host, port, config, upstream, upstream_key, route_top_k, device=device, dtype=dtype)
    engine = open_engine(store_root, max_resident=max_resident, max_batch=max_batch, route_top_k=route_top_k,
                         device=device, dtype=dtype, max_batch_tokens=max_batch_tokens,
                         memory=memory_setting(use_memory, k, max_tokens, retrieval))
    if auto_update is not None:
        from ..http.autoupdate import AutoUpdateSettings

        config.auto_update = AutoUpdateSettings(auto_update, str(engine.store.root), device=device, dtype=dtype,
                                                update_args=update_args, check_interval_s=auto_update_interval,
                                                **min_pending_of(update_args))
    try:
        run_server(engine, host, port, config)
    finally:
        engine.close(timeout=drain_timeout)


COMMANDS = [serve]
