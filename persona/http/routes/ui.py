"""The dashboard: ``GET /ui``, ``GET|POST /ui/login``, ``POST /ui/logout``, ``POST /ui/chat``,
``POST /ui/matrix`` (engine mode only; the gateway has no base to answer with, so there ``/ui`` is a 404).

``/ui`` shows, for the adapters the caller may use (the scoping of ``/v1/models``), the report
``persona report`` writes (:mod:`persona.http.report_view`), and a chat box that asks one adapter
and the base the same prompt and shows both answers side by side. The chat goes through the same
checks, scope and admission as ``/v1/chat/completions`` (:mod:`persona.http.generation`): another
user's adapter is a 404 there as here. Its chats are never logged as interactions.

Who may look (:mod:`persona.http.ui_auth`): an ``Authorization: Bearer`` token, or the session
cookie that ``POST /ui/login`` sets from one; every post on a session carries its CSRF token.
Without either, a browser is sent to the login page and an API client gets a 401.
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..errors import describe
from ..generation import admit, generation_request
from ..report_view import store_state
from ..schemas import ChatRequest
from ..state import ServerState, server_state
from ..streaming import ClientGone, results_unless_gone
from ..ui_auth import (
    COOKIE,
    LOGIN_PATH,
    UI_PATH,
    MaybeCaller,
    UiCaller,
    check_csrf,
    check_same_origin,
    clear_session_cookie,
    login_needed,
    read_form,
    set_session_cookie,
    wants_html,
)
from ..ui_pages import (
    DEFAULT_MAX_TOKENS,
    MAX_CHAT_TOKENS,
    ChatForm,
    ChatPair,
    dashboard_page,
    e,
    login_page,
)
from .models import visible_adapters
from ...errors import AuthError, EngineClosed, InvalidRequest, PersonaError

router = APIRouter(include_in_schema=False)
State = Annotated[ServerState, Depends(server_state)]


@router.get("/ui")
async def dashboard(request: Request, state: State, caller: MaybeCaller):
    if caller is None:
        if state.config.auth:
            return login_needed(request)
        # No tokens to log in with: an anonymous session, so that the page's posts still carry a CSRF token.
        caller = UiCaller(None, state.sessions.create(None))
        response = await page(state, request, caller)
        set_session_cookie(response, request, caller.session, state.sessions.ttl_s)
        return response
    return await page(state, request, caller)


@router.get("/ui/login")
async def login_form(request: Request, state: State):
    if not state.config.auth:
        return RedirectResponse(UI_PATH, status_code=303)
    return _html(state, request, login_page())


@router.post("/ui/login")
async def login(request: Request, state: State):
    check_same_origin(request)
    form = await read_form(request, state)
    if not state.config.auth:
        return RedirectResponse(UI_PATH, status_code=303)
    try:
        scope = await anyio.to_thread.run_sync(state.tokens.authenticate, form.get("token", "").strip())
    except AuthError:
        return _html(state, request, login_page("That token is not valid, or it was revoked."), status=401)
    state.sessions.drop(request.cookies.get(COOKIE))  # a fresh session id at every login, never the old one
    session = state.sessions.create(scope)
    response = RedirectResponse(UI_PATH, status_code=303)
    set_session_cookie(response, request, session, state.sessions.ttl_s)
    state.metrics.count(request.scope, 303)
    return response


@router.post("/ui/logout")
async def logout(request: Request, state: State, caller: MaybeCaller):
    if caller is None:
        return login_needed(request)
    check_csrf(request, caller, await read_form(request, state))
    if caller.session is not None:
        state.sessions.drop(caller.session.sid)
    response = RedirectResponse(LOGIN_PATH if state.config.auth else UI_PATH, status_code=303)
    clear_session_cookie(response, request)
    state.metrics.count(request.scope, 303)
    return response


@router.post("/ui/chat")
async def chat(request: Request, state: State, caller: MaybeCaller):
    if caller is None:
        return login_needed(request)
    form = await read_form(request, state)
    check_csrf(request, caller, form)
    try:
        pair = await side_by_side(state, request, caller, form)
    except ClientGone:
        state.metrics.count(request.scope, 499)  # nginx's "client closed request": nobody reads this answer
        return Response(status_code=499)
    except PersonaError as exc:
        if not wants_html(request):
            raise  # the table's status and OpenAI-shaped body, as on /v1
        error = describe(exc, "POST /ui/chat")
        sent = ChatForm(form.get("model", ""), form.get("prompt", ""), form.get("max_tokens", ""))
        response = await page(state, request, caller, form=sent, error=error.message, status=error.status)
        if error.retry_later:
            response.headers["Retry-After"] = str(state.config.retry_after_s)
        return response
    return await page(state, request, caller, chat=pair)


@router.post("/ui/matrix")
async def matrix(request: Request, state: State, caller: MaybeCaller):
    if caller is None:
        return login_needed(request)
    check_csrf(request, caller, await read_form(request, state))
    return await page(state, request, caller, matrix=True)


# ----------------------------------------------------------------------------------- the chat
def _max_tokens(raw: str | None) -> int:
    try:
        value = int(raw) if raw not in (None, "") else DEFAULT_MAX_TOKENS
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CHAT_TOKENS:
        raise InvalidRequest(f"max new tokens must be a whole number from 1 to {MAX_CHAT_TOKENS}", param="max_tokens")
    return value


async def side_by_side(state: ServerState, request: Request, caller: UiCaller, form: dict[str, str]) -> ChatPair:
    """The form's prompt to its adapter and to the base, as two rows of one batch, through the
    checks, scope and admission of ``/v1/chat/completions``."""
    model, prompt, base = form.get("model", "").strip(), form.get("prompt", ""), state.engine.base_name
    max_tokens = _max_tokens(form.get("max_tokens"))
    if not prompt.strip():
        raise InvalidRequest("type a prompt", param="messages")
    requests = [generation_request(state, ChatRequest.model_validate(
        {"model": m, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}),
        chat=True) for m in (model, base)]
    handles = await admit(state, caller.scope, requests[0], 1)
    try:
        handles += await admit(state, caller.scope, requests[1], 1)
        adapter, base_result = await results_unless_gone(request, handles)
    except CancelledError:
        raise EngineClosed("the server is stopping; the request was cancelled") from None
    finally:
        for handle in handles:
            if not handle.done():
                handle.cancel()
    return ChatPair(model=model, prompt=prompt, max_tokens=max_tokens, adapter_text=adapter.text,
                    adapter_ran="+".join(adapter.resolved) or model, base_name=base, base_text=base_result.text)


# ----------------------------------------------------------------------------------- the page
def _listing(state: ServerState, caller: UiCaller) -> tuple[list[str], str]:
    adapters = state.store.list()
    return [a.adapter for a in visible_adapters(adapters, caller.scope)], store_state(adapters)


def _placement(engine):
    """The engine's device and dtype, for the base the loss matrix loads."""
    from ...base import Placement

    return Placement(device=engine.device.type, dtype=str(engine.dtype).removeprefix("torch."))


async def report_body(state: ServerState, refs: list[str], digest: str, *, matrix: bool) -> tuple[str, bool]:
    """The report's HTML for ``refs`` and whether it has the loss matrix (cached; built in a worker thread)."""
    if not refs:
        return '<p class="ui-note">No adapter to report on yet.</p>', False
    cached = state.reports.cached(refs, digest)
    if cached is not None and (cached[1] or not matrix):
        return cached
    # One matrix at a time (it loads a base and runs every version); a few plain reports beside it.
    limiter = state.limiter("ui-matrix", 1) if matrix else state.limiter("ui-report", 2)
    placement = _placement(state.engine) if matrix else None
    try:
        body = await anyio.to_thread.run_sync(lambda: state.reports.build(
            state.store, refs, digest, matrix=matrix, placement=placement), limiter=limiter)
    except PersonaError as exc:  # a damaged adapter, a busy store: the page still shows the chat
        message = describe(exc, "/ui report").message
        return f'<div class="ui-error">The report could not be built: {e(message)}</div>', False
    return body, matrix


async def page(state: ServerState, request: Request, caller: UiCaller, *, chat: ChatPair | None = None,
               form: ChatForm | None = None, error: str | None = None, status: int = 200,
               matrix: bool = False) -> HTMLResponse:
    refs, digest = await anyio.to_thread.run_sync(_listing, state, caller)
    body, with_matrix = await report_body(state, refs, digest, matrix=matrix)
    html = dashboard_page(who=caller.who, csrf=caller.csrf, base_name=state.engine.base_name, adapters=refs,
                          report_html=body, matrix_built=with_matrix, chat=chat, form=form, error=error,
                          can_logout=caller.session is not None and state.config.auth)
    return _html(state, request, html, status=status)


def _html(state: ServerState, request: Request, html: str, status: int = 200) -> HTMLResponse:
    state.metrics.count(request.scope, status)
    return HTMLResponse(html, status_code=status)
