"""Reading a request body, after the caller is authenticated: the size cap (413 before a byte
over it is read, declared or chunked), then JSON, then the route's schema (400 naming the field).

FastAPI would read and parse a declared body parameter before any dependency ran, so a token-less
client sending bad JSON would get a 400 instead of the 401; the completion routes take their body
through :func:`json_body` instead, which depends on :func:`~persona.http.auth.caller`.
"""

from __future__ import annotations

import email.message
import json
from typing import Annotated, Any, Callable, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from ..errors import RequestTooLarge
from .auth import PUBLIC_PATHS, authenticate, bearer, caller
from .state import ServerState, server_state

Model = TypeVar("Model", bound=BaseModel)


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)")


def refuse_declared_size(request: Request, limit: int) -> None:
    """413 for a declared ``Content-Length`` over ``limit``, before anything is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large(limit)


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, counted as it comes (a chunked body declares no length): 413 once it passes ``limit``."""
    refuse_declared_size(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(content_type: str | None) -> bool:
    if not content_type:  # as FastAPI's strict content type: no header, no JSON
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def parse_body(raw: bytes, content_type: str | None, model: type[Model]) -> Model:
    """``raw`` as ``model``; a :class:`RequestValidationError` shaped as FastAPI's own (``loc`` from ``body``)."""
    value: Any = None
    if raw:
        value = raw
        if _is_json(content_type):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                               "input": {}, "ctx": {"error": exc.msg}}]) from None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def json_body(model: type[Model]) -> Callable[..., Any]:
    """A dependency yielding the body as ``model``, read only once the caller is authenticated."""

    async def read(request: Request, state: Annotated[ServerState, Depends(server_state)],
                   _caller: Annotated[object, Depends(caller)]) -> Model:
        raw = await read_capped(request, state.config.max_body_bytes)
        return parse_body(raw, request.headers.get("content-type"), model)

    return read


async def refuse_unrouted(request: Request) -> None:
    """For a request no route takes: the 401 (then the 413) it would have got from a route."""
    state = server_state(request)
    if request.url.path not in PUBLIC_PATHS:
        authenticate(state, await bearer(request))
    refuse_declared_size(request, state.config.max_body_bytes)
