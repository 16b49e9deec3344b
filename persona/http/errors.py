"""Every error the server answers, as OpenAI's ``{"error": {message, type, param, code}}``.

One handler turns any :class:`~persona.errors.PersonaError` into its answer by reading
:data:`persona.errors.ERROR_TABLE` (:func:`describe`); the others cover what FastAPI and Starlette
raise themselves (a body that fails validation, an unknown path or method) and, in
:class:`ErrorGuard`, anything that escaped every handler (a 500 that tells the client nothing
internal). A server-side fault whose message is meant for the operator (a damaged adapter: "run
``persona verify``") is logged here in full and answered with the table's generic line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PersonaError, mapping_for
from .metrics import route_label

log = logging.getLogger("persona.http.app")  # the server's one log, whichever module writes to it


@dataclass(frozen=True)
class ErrorBody:
    """One OpenAI-shaped error answer."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    retry_later: bool = False

    def content(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


INTERNAL = ErrorBody(500, "internal server error (logged by the server)", "server_error", "internal_error")


def describe(exc: PersonaError, where: str = "") -> ErrorBody:
    """``exc`` as the client sees it, from its row of the error table (logged when the row hides it)."""
    row = mapping_for(exc)
    message = str(exc)
    if row.client_message is not None:
        log.error("%s%s: %s", f"{where}: " if where else "", type(exc).__name__, message)
        message = row.client_message
    return ErrorBody(row.http_status, message, row.openai_type, getattr(exc, "code", None) or row.code,
                     getattr(exc, "param", None) or row.param, row.retry_later)


class _AsciiJSON(JSONResponse):
    # An error message may quote the client's input, lone surrogates included: escaped, it always encodes.
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: ErrorBody, retry_after_s: int = 1) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if error.retry_later else None
    return _AsciiJSON(status_code=error.status, content=error.content(), headers=headers)


def _answer(request: Request, error: ErrorBody) -> JSONResponse:
    state = request.app.state.persona
    state.metrics.count(request.scope, error.status)
    return error_response(error, state.config.retry_after_s)


async def on_persona_error(request: Request, exc: PersonaError) -> JSONResponse:
    """The one handler of every library error: status, type, code and param from the error table."""
    return _answer(request, describe(exc, f"{request.method} {route_label(request.scope)}"))


async def on_invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, not an object, or breaks the schema: a 400 naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request body")
    if first.get("type") == "json_invalid":  # its loc ends in a byte offset, not a field: no param
        message, where = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", ""
    elif not where:  # the body as a whole: not an object, or not sent as JSON (curl -d sends a form)
        sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
        message = "the body must be a JSON object" + (
            "" if sent == "application/json" else "; send Content-Type: application/json")
    return _answer(request, ErrorBody(400, message, "invalid_request_error", param=where or None))


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """No route for this path or method. Authentication still comes first: without a valid token
    every path but /healthz is a 401, so a token-less client cannot map the routes."""
    from .body import refuse_unrouted

    try:
        await refuse_unrouted(request)
    except PersonaError as refused:  # AuthError (401) or RequestTooLarge (413)
        return await on_persona_error(request, refused)
    return _answer(request, ErrorBody(exc.status_code, str(exc.detail), "invalid_request_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PersonaError, on_persona_error)
    app.add_exception_handler(RequestValidationError, on_invalid_body)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


class ErrorGuard:
    """Pure ASGI middleware in front of every route: one OpenAI-shaped JSON 500 for any unhandled
    error (logged here with its traceback; the client learns nothing internal).

    Not ``BaseHTTPMiddleware``: that would stand between the routes and the client's disconnect
    and re-buffer streamed responses.
    """

    def __init__(self, app, *, count):
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:  # noqa: BLE001 - whatever escaped every handler: logged here, never sent to the client
            log.exception("unhandled error on %s %s", scope["method"], route_label(scope))
            if started:  # the status line is out: end the body cleanly rather than reset the connection
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception:  # noqa: BLE001 - the client may be gone
                    pass
                return
            self.count(scope, INTERNAL.status)
            await error_response(INTERNAL)(scope, receive, send)
