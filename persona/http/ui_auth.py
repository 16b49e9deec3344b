"""Who is looking at the dashboard (``/ui``), and whether a form post really comes from it.

A caller is known by an ``Authorization: Bearer`` header (as on ``/v1``), or by the session cookie
``POST /ui/login`` sets from a token (:mod:`persona.http.sessions`). A token in the URL query is
never read: URLs end up in logs, history and ``Referer`` headers. The ``/v1`` API never reads the
cookie: only the dashboard's own form posts, which carry the session's CSRF token, act on it.

The cookie: ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it),
``Path=/ui`` (the API never sees it), ``Secure`` when the request came over https.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from ..errors import AuthError, CrossSiteRequest, InvalidRequest
from ..store.tokens import Scope
from .auth import authenticate, bearer
from .body import read_capped
from .sessions import UiSession
from .state import ServerState, server_state

COOKIE = "persona_ui"
UI_PATH = "/ui"
LOGIN_PATH = "/ui/login"
MAX_FORM_BYTES = 64 << 10  # a prompt typed into a text box; the context bounds it long before this


@dataclass(frozen=True)
class UiCaller:
    """The dashboard's caller: a token's scope (None: the server runs without authentication) and
    the session it came with (None: an ``Authorization`` header, which no other site can send, so
    its posts need no CSRF token)."""

    scope: Scope | None
    session: UiSession | None

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session is not None else ""

    @property
    def who(self) -> str:
        return "anyone (authentication is off)" if self.scope is None else self.scope.subject


def identify(state: ServerState, request: Request, credentials: HTTPAuthorizationCredentials | None) -> UiCaller | None:
    """The caller, or None when nobody is logged in; :class:`AuthError` (401) for a bad bearer token.

    A session is honoured only while its token is still valid: a revoked token (or a deleted user)
    ends its sessions at their next request."""
    if credentials is not None:
        return UiCaller(authenticate(state, credentials), None)
    session = state.sessions.get(request.cookies.get(COOKIE))
    if session is None:
        return None
    if state.config.auth and (session.scope is None or not state.tokens.still_valid(session.scope)):
        state.sessions.drop(session.sid)
        return None
    return UiCaller(session.scope, session)


def ui_caller(request: Request, state: Annotated[ServerState, Depends(server_state)],
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> UiCaller | None:
    """The dependency (a plain function: FastAPI runs it in a worker thread, as it reads the tokens file)."""
    return identify(state, request, credentials)


MaybeCaller = Annotated[UiCaller | None, Depends(ui_caller)]


def wants_html(request: Request) -> bool:
    """Whether a browser asked (it accepts HTML); an API client gets JSON errors instead of pages."""
    return "text/html" in request.headers.get("accept", "")


def login_needed(request: Request) -> Response:
    """No caller: a browser goes to the login page (and loses a stale cookie); an API client gets a 401."""
    if not wants_html(request):
        raise AuthError("missing or malformed bearer token: send Authorization: Bearer <token>, or log in at "
                        f"{LOGIN_PATH} (issue a token with `persona token create`)")
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    if COOKIE in request.cookies:
        clear_session_cookie(response, request)
    return response


def check_same_origin(request: Request) -> None:
    """Refuse a post another site's page made (:class:`CrossSiteRequest`, 403), where the browser says
    so: ``Sec-Fetch-Site`` (every current browser), else ``Origin``."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        if fetch_site not in ("same-origin", "none"):  # none: typed or bookmarked, no page made it
            raise CrossSiteRequest(f"refused a {fetch_site} form post: use the dashboard's own page")
        return
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise CrossSiteRequest("refused a form post from another origin: use the dashboard's own page")


def check_csrf(request: Request, caller: UiCaller, form: dict[str, str]) -> None:
    """A post on a session must come from the dashboard: same origin, and the session's CSRF token."""
    check_same_origin(request)
    if caller.session is not None and not caller.session.csrf_matches(form.get("csrf")):
        raise CrossSiteRequest("the form's CSRF token is missing or not this session's: reload /ui and send it again")


async def read_form(request: Request, state: ServerState) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (what an HTML form posts), first value of each field."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the dashboard's form (Content-Type: application/x-www-form-urlencoded)")
    raw = await read_capped(request, min(MAX_FORM_BYTES, state.config.max_body_bytes))
    try:
        fields = urllib.parse.parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                                       max_num_fields=16, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the form is not valid UTF-8 form data") from None
    return {key: values[0] for key, values in fields.items()}


def set_session_cookie(response: Response, request: Request, session: UiSession, ttl_s: float) -> None:
    response.set_cookie(COOKIE, session.sid, max_age=int(ttl_s), path=UI_PATH, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=UI_PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https")
