"""CLI commands that serve adapters: ``serve``, ``generate``, ``chat``, ``token``."""

from __future__ import annotations


import click

from .main import _open, emit, json_option, store_option
from ..refs import MAX_STACK

MAX_BODY_BYTES = 4 << 20  # persona.server.MAX_BODY_BYTES, without importing FastAPI for every command


def _engine(store_root, max_resident: int = 16, max_batch: int = 8, route_top_k: int = 1):
    from ..serving.engine import Engine

    return Engine(_open(store_root), max_resident=max_resident, max_batch=max_batch, route_top_k=route_top_k)


def route_top_k_option(f):
    return click.option(
        "--route-top-k", type=click.IntRange(1, MAX_STACK), default=1, show_default=True,
        help="How many domain adapters domain:auto becomes, weighted by the router (softmax of their scores, "
             "summing to 1; 1: the best domain at weight 1).",
    )(f)


def _params(max_new_tokens, temperature, top_p, seed, stop):
    from ..serving.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop))


def sampling_options(f):
    f = click.option("--stop", multiple=True, help="Stop string (repeatable); the text before it is returned.")(f)
    f = click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same text).")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)(f)
    f = click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True, help="0 is greedy.")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=128, show_default=True)(f)
    return f


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="Send PROMPT as plain text instead of a chat message through the chat template.")
@route_top_k_option
@sampling_options
@store_option
@json_option
def generate(model, prompt, raw, route_top_k, max_new_tokens, temperature, top_p, seed, stop, store_root, as_json) -> None:
    """Answer PROMPT with MODEL: an adapter (user:alice), a stack (user:alice+domain:finance) or the base's name.

    \b
    A part of a stack may carry a weight that scales its LoRA delta, in (0, 10]:
    'user:alice+domain:finance*0.5' (quote it: * is a shell wildcard). domain:auto
    lets the router pick domains for PROMPT (--route-top-k of them); --json shows
    the stack that ran ("resolved").

    \b
    Examples:
      persona generate user:alice "What's my dog's name?"
      persona generate 'user:alice+domain:finance*0.5' "Should I buy bonds?"
      persona generate user:alice+domain:auto --route-top-k 2 "Should I buy bonds?"
      persona generate smollm2-135m-instruct "What's my dog's name?"     (the base alone)
    """
    from ..serving.requests import GenerationRequest

    engine = _engine(store_root, max_resident=MAX_STACK, max_batch=1, route_top_k=route_top_k)
    try:
        request = GenerationRequest(
            model=model, prompt=prompt if raw else None,
            messages=None if raw else ({"role": "user", "content": prompt},),
            params=_params(max_new_tokens, temperature, top_p, seed, stop),
        )
        if as_json:
            result = engine.generate([request])[0]
            emit(True, {"model": model, "resolved": list(result.resolved), "text": result.text,
                        "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens})
            return
        for delta in engine.stream(request):
            click.echo(delta, nl=False)
        click.echo()
    finally:
        engine.close()


@click.command()
@click.argument("model")
@click.option("--system", default=None, help="A system message for the conversation.")
@route_top_k_option
@sampling_options
@store_option
def chat(model, system, route_top_k, max_new_tokens, temperature, top_p, seed, stop, store_root) -> None:
    """Chat with MODEL interactively (empty line or Ctrl-D to quit).

    \b
    MODEL is what `persona generate` takes, weighted stacks included. With domain:auto the
    router picks again at every turn, from the conversation's user turns so far.

    \b
    Examples:
      persona chat user:alice
      persona chat user:alice+domain:auto --system "Answer briefly."
    """
    from ..serving.requests import GenerationRequest

    engine = _engine(store_root, max_resident=MAX_STACK, max_batch=1, route_top_k=route_top_k)
    engine.check(model)  # fail before the first prompt
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo(f"chatting with {model} (empty line to quit)", err=True)
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            request = GenerationRequest(model=model, messages=tuple(messages),
                                        params=_params(max_new_tokens, temperature, top_p, seed, stop))
            pieces = []
            for delta in engine.stream(request):
                pieces.append(delta)
                click.echo(delta, nl=False)
            click.echo()
            messages.append({"role": "assistant", "content": "".join(pieces)})
    finally:
        engine.close()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--max-resident", default=16, show_default=True, type=click.IntRange(1, 4096), help="Adapters held in engine slots at once.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256), help="Requests batched into one forward pass.")
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
@store_option
def serve(host, port, max_resident, max_batch, no_auth, log_interactions, max_body_bytes, max_queue, max_per_token,
          drain_timeout, route_top_k, store_root) -> None:
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
    Examples:
      persona serve --port 8000
      persona serve --port 8000 --route-top-k 2 --log-interactions
    """
    from ..http.app import ServerConfig, serve as run_server

    if no_auth:
        click.secho("WARNING: --no-auth: authentication is OFF. Anyone who can reach "
                    f"{host}:{port} can use every adapter, including every user's.", fg="red", bold=True, err=True)
    engine = _engine(store_root, max_resident=max_resident, max_batch=max_batch, route_top_k=route_top_k)
    try:
        run_server(engine, host, port, ServerConfig(
            auth=not no_auth, log_interactions=log_interactions, max_body_bytes=max_body_bytes, max_queue=max_queue,
            max_per_token=max_per_token, drain_timeout_s=drain_timeout))
    finally:
        engine.close(timeout=drain_timeout)


@click.group()
def token() -> None:
    """Bearer tokens for `persona serve` (stored hashed in the store).

    \b
    Examples:
      persona token create user:alice
      persona token list
      persona token revoke 1a2b3c4d5e6f
    """


@token.command("create")
@click.argument("ref", required=False)
@click.option("--admin", is_flag=True, help="A token that reaches every adapter.")
@store_option
@json_option
def token_create(ref, admin, store_root, as_json) -> None:
    """Issue a token for user adapter REF (its own adapters + shared domains), or --admin.

    \b
    Examples:
      persona token create user:alice
      persona token create --admin --json
    """
    from ..store.tokens import ADMIN

    if bool(ref) == bool(admin):
        raise click.UsageError("give a user adapter (user:NAME) or --admin")
    secret, info = _open(store_root).tokens.create(ADMIN if admin else ref)
    emit(as_json, {"token": secret, **info.to_dict()},
         f"{secret}\n(token id {info.token_id} for {info.subject}; shown once, stored only as a hash)")


@token.command("list")
@store_option
@json_option
def token_list(store_root, as_json) -> None:
    """List issued tokens (ids and scopes, never secrets).

    \b
    Examples:
      persona token list --json
    """

    infos = _open(store_root).tokens.list()
    if as_json:
        emit(True, [i.to_dict() for i in infos])
        return
    for i in infos:
        click.echo(f"{i.token_id}  {i.subject:30}  {i.created}")
    if not infos:
        click.echo("no tokens: issue one with `persona token create user:NAME`")


@token.command("revoke")
@click.argument("token_id")
@store_option
@json_option
def token_revoke(token_id, store_root, as_json) -> None:
    """Revoke the token with TOKEN_ID (see `persona token list`).

    \b
    Examples:
      persona token revoke 1a2b3c4d5e6f
    """

    _open(store_root).tokens.revoke(token_id)
    emit(as_json, {"token_id": token_id, "revoked": True}, f"revoked {token_id}")


COMMANDS = [generate, chat, serve, token]
