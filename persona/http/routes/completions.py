"""``POST /v1/chat/completions`` and ``POST /v1/completions``: JSON answers or server-sent events.

Each request is checked (:mod:`persona.http.generation`), admitted and submitted as n rows, then
answered when the rows end (or streamed as they decode); with ``--log-interactions`` a chat's
answer is appended to its user's pending interactions. Every answer carries the header
``x-persona-model``: the pinned stack that ran (``user:alice@v3``), as the gateway's answers do, so a
client sees which version answered (after ``persona update`` or the auto-update loop moved ``current``).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import CancelledError
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..auth import Caller
from ..body import json_body
from ..generation import admit, generation_request, resolved_body
from ..openai_schema import chat_logprobs, completion_logprobs
from ..schemas import ChatRequest, CompletionCommon, CompletionRequest
from ..state import ServerState, server_state
from ..streaming import ClientGone, results_unless_gone, sse_chunks, stream_unless_gone, total, usage
from ...errors import EngineClosed, InvalidInteractions, PersonaError
from ...interactions import SYSTEM_ALIAS
from ...refs import parse_stack

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]
PINNED_HEADER = "x-persona-model"


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State, scope: Caller,
                           body: Annotated[ChatRequest, Depends(json_body(ChatRequest))]):
    return await complete(state, request, scope, body, route="/v1/chat/completions", chat=True)


@router.post("/v1/completions")
async def completions(request: Request, state: State, scope: Caller,
                      body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]):
    return await complete(state, request, scope, body, route="/v1/completions", chat=False)


async def complete(state: ServerState, request: Request, scope, body: CompletionCommon, *, route: str, chat: bool):
    started = time.perf_counter()
    gen = generation_request(state, body, chat)
    handles = await admit(state, scope, gen, body.n)
    resolved = resolved_body(state, gen, handles)  # memory in play: which memories the prompt holds
    messages = logged_messages(gen.messages) if chat else None
    pinned = {PINNED_HEADER: "+".join(handles[0].resolved)}  # every choice runs the same pinned stack
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        on_text = (lambda text: log_chat(state, body.model, messages, text)) if chat else None
        chunks = sse_chunks(state, handles, rid, created, body.model, chat=chat, route=route, started=started,
                            include_usage=include_usage, on_text=on_text, resolved=resolved)
        return StreamingResponse(stream_unless_gone(state, request, handles, chunks, route, started),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **pinned})
    try:
        results = await results_unless_gone(request, handles)
    except ClientGone:
        state.metrics.record(route, "499", started)  # nginx's "client closed request": nobody reads this answer
        return Response(status_code=499)
    except CancelledError:
        raise EngineClosed("the server is stopping; the request was cancelled") from None
    except PersonaError:
        for handle in handles:
            handle.cancel()
        raise
    result = total(results)
    state.metrics.record(route, "200", started, result)
    if chat:
        log_chat(state, body.model, messages, results[0].text)  # one interaction per request, whatever n
    body_out = answer(results, rid, created, body.model, chat=chat, result=result)
    if resolved is not None:
        body_out["resolved"] = resolved
    return JSONResponse(body_out, headers=pinned)


def answer(results, rid: str, created: int, model: str, *, chat: bool, result) -> dict:
    """The OpenAI body of a finished (non-streamed) request."""
    choices = []
    for i, r in enumerate(results):
        logprobs = None
        if r.logprobs is not None:
            logprobs = chat_logprobs(r.logprobs) if chat else completion_logprobs(r.logprobs)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                            "logprobs": logprobs, "finish_reason": r.finish_reason})
        else:
            choices.append({"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": logprobs})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage(result)}


def logged_messages(messages) -> list[dict[str, str]]:
    """A chat's messages as the interaction log keeps them: OpenAI's plain form, developer as system, no names."""
    return [{"role": "system" if m["role"] == SYSTEM_ALIAS else m["role"], "content": m["content"]} for m in messages]


def log_chat(state: ServerState, model: str, messages: list[dict[str, str]], answer_text: str) -> None:
    """With ``--log-interactions``: a chat on exactly one user adapter joins that user's pending interactions."""
    if not state.config.log_interactions or not answer_text.strip():
        return
    users = [p.ref for p in parse_stack(model) if p.ref.kind == "user"] if model != state.engine.base_name else []
    if len(users) != 1:
        return
    from ...interactions import Interaction

    try:
        interaction = Interaction.from_json({"messages": messages + [{"role": "assistant", "content": answer_text}]},
                                            source="server", line=1)
        state.store.log(users[0].unpinned(), [interaction])
    except (InvalidInteractions, PersonaError):
        pass  # logging is best effort; the answer was served
