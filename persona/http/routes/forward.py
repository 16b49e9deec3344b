"""The gateway's ``POST /v1/chat/completions`` and ``POST /v1/completions``: checked here, run upstream.

Each request passes the same front door as on the engine's server: the token (401), the body cap
(413), the schema and the fields persona refuses (400), the model's grammar (400) and the token's
reach (404, identical to an unknown adapter), then the admission limits (429). Its model is pinned
(``domain:auto`` routed) and the body goes to the upstream chosen by rendezvous hashing, as the
client sent it but for ``model``. What needs the base's tokenizer (a ``logit_bias`` id, a prompt
longer than the context, a ``response_format`` schema) is checked by the upstream, whose 400
comes back as it is.

The answer: an upstream's error status and body are passed back (a refusal of the gateway's own
key is the operator's problem: 502); a JSON answer and every streamed event carry ``model`` as the
client sent it, as persona's own server answers, and the header ``x-persona-model`` names the
pinned model that ran upstream. Streams are relayed event by event, never buffered whole; a client
that goes away closes the upstream request (the upstream stops generating).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Awaitable, Callable, TypeVar

import anyio
import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..auth import Caller
from ..body import parse_body, read_capped
from ..errors import log
from ..generation import check_model, not_found, refuse_unencodable, refuse_unsupported, sampling
from ..relay import SseRelay, Usage, choice_text
from ..schemas import ChatRequest, CompletionCommon, CompletionRequest
from ..state import ServerState, server_state
from ..streaming import ClientGone, _client_gone
from ..upstream import HOP_HEADER, Forwarded
from .completions import PINNED_HEADER, log_chat, logged_messages
from ...errors import AdapterNotFound, NoDomainToRoute, UpstreamRejected, UpstreamUnavailable, VersionNotFound
from ...refs import parse_stack
from ...serving.resolve import is_auto

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]
T = TypeVar("T")


@dataclass(frozen=True)
class SentBody:
    """A validated body and the JSON object it came as (what is forwarded, ``model`` replaced)."""

    body: CompletionCommon
    data: dict[str, Any]


def sent_body(model: type[CompletionCommon]) -> Callable[..., Any]:
    """A dependency: the body read after authentication (as :func:`persona.http.body.json_body`), kept as sent."""

    async def read(request: Request, state: State, _caller: Caller) -> SentBody:
        raw = await read_capped(request, state.config.max_body_bytes)
        body = parse_body(raw, request.headers.get("content-type"), model)  # a 400 unless a JSON object
        return SentBody(body, json.loads(raw))

    return read


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State, scope: Caller,
                           sent: Annotated[SentBody, Depends(sent_body(ChatRequest))]):
    return await forward(state, request, scope, sent, route="/v1/chat/completions", chat=True)


@router.post("/v1/completions")
async def completions(request: Request, state: State, scope: Caller,
                      sent: Annotated[SentBody, Depends(sent_body(CompletionRequest))]):
    return await forward(state, request, scope, sent, route="/v1/completions", chat=False)


def pin_model(state: ServerState, body: CompletionCommon, scope, chat: bool) -> tuple:
    """The pinned stack for this request: scope and grammar checked, ``domain:auto`` routed (a worker thread:
    it reads the store, and routing runs the base)."""
    pinned = check_model(state, body.model, scope)
    if body.model == state.engine.base_name or not any(is_auto(p.ref) for p in parse_stack(body.model)):
        return pinned
    prompt = tuple(m.for_engine() for m in body.messages) if chat else body.prompt
    try:
        return state.engine.pin(body.model, prompt)
    except NoDomainToRoute:  # every part was allowed: nothing left to hide
        raise
    except (AdapterNotFound, VersionNotFound):  # moved under us, or no domain to route to at all
        raise not_found(body.model) from None


async def forward(state: ServerState, request: Request, scope, sent: SentBody, *, route: str, chat: bool):
    started = time.perf_counter()
    gateway, body = state.engine, sent.body
    if request.headers.get(HOP_HEADER) == gateway.pool.hop_id:
        raise UpstreamRejected("an --upstream URL leads back to this gateway itself: an upstream must be a model "
                               "server (vLLM with persona's resolver, or persona serve without --upstream)")
    refuse_unsupported(state, body, "chat" if chat else "completions")
    refuse_unencodable(body)
    sampling(state, body, compile_format=False)  # the ranges and max_tokens limit, as the engine's server
    ticket = state.gate.admit(scope.token_id if scope is not None else None)  # Overloaded: 429
    try:
        pinned = await anyio.to_thread.run_sync(pin_model, state, body, scope, chat,
                                                limiter=state.limiter("admission", 4))
        upstream_model = gateway.upstream_model(pinned)
        payload = json.dumps({**sent.data, "model": upstream_model}).encode()
        # A whole answer's status line comes when the upstream has finished: a client that leaves meanwhile
        # must stop the upstream's generation (the cancelled send closes its connection).
        forwarded = await unless_gone(request, gateway.pool.send(gateway.affinity_key(pinned), route, payload))
        gateway.sent.record(forwarded.upstream, upstream_model, pinned)  # unloaded there if deleted later
    except ClientGone:
        ticket.release()
        state.metrics.record(route, "499", started)  # nginx's "client closed request": nobody reads this answer
        return Response(status_code=499)
    except BaseException:
        ticket.release()
        raise
    on_text = None
    if chat and state.config.log_interactions:
        on_text = partial(log_chat, state, body.model, logged_messages([m.for_engine() for m in body.messages]))
    headers = {PINNED_HEADER: upstream_model}
    if forwarded.response.status_code >= 400 or not body.stream:
        try:
            return await whole_answer(state, request, forwarded, body.model, chat=chat, route=route, started=started,
                                      headers=headers, on_text=on_text)
        finally:
            ticket.release()
    relay = SseRelay(body.model, chat=chat)

    async def cleanup() -> None:  # idempotent; also when the stream never started (the client left at once)
        await _close(forwarded.response)
        ticket.release()

    return RelayResponse(relayed(state, forwarded, relay, ticket.release, route=route, started=started,
                                 on_text=on_text), cleanup,
                         media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


class RelayResponse(StreamingResponse):
    """A stream whose ``cleanup`` runs however the response ends: a generator that was never started
    (the client went away before the first event) runs no ``finally`` of its own."""

    def __init__(self, content, cleanup: Callable[[], Any], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


async def _close(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):  # also when cancelled: the upstream must see the request end
        await response.aclose()


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; :class:`ClientGone` (``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)  # its cleanup (closing the connection) has run
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def read_unless_gone(request: Request, forwarded: Forwarded) -> bytes | None:
    """The upstream's whole body; None if the client disconnected first (the upstream request is closed,
    so the upstream stops generating)."""
    try:
        return await unless_gone(request, forwarded.response.aread())
    except ClientGone:
        return None
    except httpx.HTTPError as exc:  # the upstream broke off its answer
        raise UpstreamUnavailable(f"{forwarded.upstream} broke off its answer: {type(exc).__name__}: {exc}") from None
    finally:
        await _close(forwarded.response)


async def whole_answer(state: ServerState, request: Request, forwarded: Forwarded, model: str, *, chat: bool,
                       route: str, started: float, headers: dict[str, str], on_text) -> Response:
    """A non-streamed answer, or an upstream's error (whatever was asked), passed back."""
    status = forwarded.response.status_code
    content_type = forwarded.response.headers.get("content-type", "application/json")
    raw = await read_unless_gone(request, forwarded)
    if raw is None:
        state.metrics.record(route, "499", started)  # nginx's "client closed request"
        return Response(status_code=499)
    if status in (401, 403):  # the upstream refused the gateway's key, not the client's request
        raise UpstreamRejected(f"{forwarded.upstream} answered {status} to the gateway: check --upstream-key "
                               f"(PERSONA_UPSTREAM_API_KEY): {raw[:200]!r}")
    if status >= 400:
        state.metrics.record(route, str(status), started)
        passed = {k: v for k, v in forwarded.response.headers.items() if k.lower() == "retry-after"}
        return Response(raw, status_code=status, media_type=content_type, headers=passed)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise UpstreamRejected(f"{forwarded.upstream} answered {status} with a body that is not JSON: "
                               f"{raw[:200]!r}") from None
    if isinstance(answer, dict) and "model" in answer:
        answer["model"] = model  # as persona's own server: the name the client sent
    state.metrics.record(route, str(status), started, Usage.of(answer.get("usage")) if isinstance(answer, dict) else None)
    text = choice_text(answer, chat=chat, streamed=False)
    if on_text is not None and text:
        await anyio.to_thread.run_sync(on_text, text)
    return JSONResponse(answer, status_code=status, headers=headers)


async def relayed(state: ServerState, forwarded: Forwarded, relay: SseRelay, release: Callable[[], None], *,
                  route: str, started: float, on_text):
    """The upstream's events as they come; an upstream that breaks off mid-stream ends it with an error event."""
    status = "499"  # unless the stream ends otherwise: the client went away
    try:
        async for data in forwarded.response.aiter_raw():
            out = relay.feed(data)
            if out:
                yield out
        tail = relay.flush()
        if tail:
            yield tail
        status = "200" if relay.finished and not relay.failed else "502"
    except httpx.HTTPError as exc:  # the status line is sent: the error goes in the stream (never retried)
        status = "502"
        log.warning("upstream %s broke off a stream: %s: %s", forwarded.upstream, type(exc).__name__, exc)
        error = {"message": "the upstream server broke off the answer", "type": "server_error", "param": None,
                 "code": "upstream_unavailable"}
        yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n" + b"data: [DONE]\n\n"
    finally:
        await _close(forwarded.response)
        release()
        state.metrics.record(route, status, started, relay.usage)
    if status == "200" and on_text is not None and relay.text.strip():
        await anyio.to_thread.run_sync(on_text, relay.text)
