"""Who is calling: one FastAPI dependency (:func:`caller`) that reads the bearer token once per
request and yields its :class:`~persona.store.tokens.Scope` (None with authentication off).

Every route but ``/healthz`` depends on it, and the request body is read only after it (see
:mod:`persona.http.body`), so a client without a valid token gets a 401 whatever it sends.
A path or method no route takes is checked the same way (:func:`persona.http.body.refuse_unrouted`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import AuthError
from ..store.tokens import Scope
from .state import ServerState, server_state

bearer = HTTPBearer(auto_error=False)  # a missing or non-Bearer header is None here, and a 401 below
PUBLIC_PATHS = frozenset({"/healthz"})


def authenticate(state: ServerState, credentials: HTTPAuthorizationCredentials | None) -> Scope | None:
    """The token's scope, or None when the server runs without authentication; :class:`AuthError` (401)."""
    if not state.config.auth:
        return None
    try:
        return state.tokens.authenticate(credentials.credentials if credentials is not None else None)
    except AuthError as exc:
        raise AuthError(f"{exc}: send Authorization: Bearer <token> (issue one with `persona token create`)") from None


def caller(state: Annotated[ServerState, Depends(server_state)],
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Scope | None:
    """The dependency: the caller's scope (FastAPI runs it once per request, however many depend on it)."""
    return authenticate(state, credentials)


Caller = Annotated[Scope | None, Depends(caller)]
"""A route parameter holding the caller's scope."""
