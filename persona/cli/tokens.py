"""CLI commands that manage the bearer tokens of ``persona serve``: ``token create|list|revoke``."""

from __future__ import annotations

import click

from ._common import emit, json_option, open_store, store_option


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
    secret, info = open_store(store_root).tokens.create(ADMIN if admin else ref)
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
    infos = open_store(store_root).tokens.list()
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
    open_store(store_root).tokens.revoke(token_id)
    emit(as_json, {"token_id": token_id, "revoked": True}, f"revoked {token_id}")


COMMANDS = [token]
