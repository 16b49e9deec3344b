"""Waiting on the engine without holding the event loop: a whole answer (:func:`results_unless_gone`)
or server-sent events (:func:`sse_chunks` wrapped by :func:`stream_unless_gone`), cancelling the
engine's rows when the client goes away or the server stops."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from concurrent.futures import CancelledError
from dataclasses import replace
from typing import Any, Callable, Iterator

from fastapi import Request

from ..errors import PersonaError
from ..serving.requests import when_all_done
from .errors import describe, log
from .openai_schema import chat_logprobs, completion_logprobs
from .state import ServerState

_END = object()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def total(results):
    """One result carrying the request's usage: the prompt once, every choice's completion tokens."""
    return replace(results[0], completion_tokens=sum(r.completion_tokens for r in results))


def usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


# ------------------------------------------------------------------------------ a whole answer
async def _client_gone(receive) -> None:
    """Return when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    try:
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
    except RuntimeError:  # the loop has closed: nobody waits for this request any more
        pass


async def results_unless_gone(request: Request, handles) -> list:
    """The handles' results, awaited without holding a thread; if the client disconnects first (or
    this task is cancelled, as when the server stops), the requests are cancelled in the engine."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    when_all_done(handles, lambda: _wake(loop, finished))
    gone = asyncio.ensure_future(_client_gone(request.receive))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        for handle in handles:
            if not handle.done():
                handle.cancel()  # its row stops at the next decode step
    if not finished.done() and not all(h.done() for h in handles):
        raise ClientGone()
    return [h.result(timeout=0) for h in handles]


# ------------------------------------------------------------------------------------- streams
async def stream_unless_gone(state: ServerState, request: Request, handles, chunks: Iterator[str], route: str,
                             started: float):
    """``chunks`` (a blocking iterator) as an async stream that cancels the request when the client
    goes away, the server stops it, or it breaks (an error event then ends the stream)."""
    import anyio

    status = "499"  # nginx's "client closed request", unless the stream ends otherwise

    gone = asyncio.ensure_future(_client_gone(request.receive))
    gone.add_done_callback(lambda task: task.cancelled() or [h.cancel() for h in handles])
    try:
        while True:
            # abandon_on_cancel: a cancelled stream returns at once, not after the engine's next token
            piece = await anyio.to_thread.run_sync(next, chunks, _END, abandon_on_cancel=True,
                                                   limiter=state.limiter("streams", state.config.max_queue + 8))
            if piece is _END:
                return
            yield piece
    except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        if isinstance(exc, CancelledError):  # cancelled in the engine: the server is stopping
            status, error = "503", {"message": "the server is stopping; the request was cancelled",
                                    "code": "server_stopping"}
        else:
            log.exception("a streaming response failed")
            status, error = "500", {"message": "internal server error (logged by the server)",
                                    "code": "internal_error"}
        yield "data: " + json.dumps({"error": {**error, "type": "server_error", "param": None}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        gone.cancel()
        if any([h.cancel() for h in handles]) or status != "499":  # a list: cancel every choice
            state.metrics.record(route, status, started)


def _merged(handles) -> Iterator[tuple[int, Any]]:
    """``(choice, Delta)`` from every handle as it is produced, and ``(choice, None)`` when one ends.

    One choice is read in this thread; more are read by one thread each. Closing the generator
    (a client that went away) cancels every choice; a choice's error is raised here.
    """
    if len(handles) == 1:
        for delta in handles[0].stream(with_logprobs=True):
            yield 0, delta
        yield 0, None
        return
    events: queue.SimpleQueue = queue.SimpleQueue()

    def pump(i: int, handle) -> None:
        try:
            for delta in handle.stream(with_logprobs=True):
                events.put((i, delta))
            events.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            events.put((i, exc))

    threads = [threading.Thread(target=pump, args=(i, h), daemon=True) for i, h in enumerate(handles)]
    for thread in threads:
        thread.start()
    open_choices = len(handles)
    try:
        while open_choices:
            i, item = events.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                open_choices -= 1
            yield i, item
    finally:
        for handle in handles:
            handle.cancel()


def sse_chunks(state: ServerState, handles, rid: str, created: int, model: str, *, chat: bool, route: str,
               started: float, include_usage: bool = False,
               on_text: Callable[[str], None] | None = None, resolved: dict | None = None) -> Iterator[str]:
    """The OpenAI chunks of a streamed answer, ``data: [DONE]`` last; ``on_text`` gets choice 0's
    whole text once it ends well; ``resolved`` (memory in play) rides on each choice's first chunk.
    A library error mid-stream becomes an error event from the table."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(handles)  # legacy logprobs: text_offset runs on across a choice's chunks

    def chunk(index: int, delta_text: str | None, finish: str | None, first: bool = False, entries=None) -> str:
        logprobs = None
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
            if entries is not None:
                logprobs = chat_logprobs(entries)
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            if entries is not None:
                logprobs = completion_logprobs(entries, offsets[index])
                offsets[index] += sum(len(e.token) for e in entries)
            choice = {"index": index, "text": delta_text or "", "finish_reason": finish, "logprobs": logprobs}
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        if first and resolved is not None:
            body["resolved"] = resolved
        return "data: " + json.dumps(body) + "\n\n"

    pieces: list[str] = []
    try:
        if chat:
            for i in range(len(handles)):
                yield chunk(i, None, None, first=True)
        for i, delta in _merged(handles):
            if delta is None:  # choice i is done
                yield chunk(i, None, handles[i].result().finish_reason)
                continue
            if i == 0:
                pieces.append(delta.text)
            records = handles[i].request.params.logprobs is not None
            yield chunk(i, delta.text, None, entries=delta.logprobs if records else None)
        result = total([h.result() for h in handles])
        if include_usage:
            yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                         "choices": [], "usage": usage(result)}) + "\n\n"
        state.metrics.record(route, "200", started, result)
        if on_text is not None:
            on_text("".join(pieces))
    except PersonaError as exc:
        error = describe(exc, f"stream on {route}")
        state.metrics.record(route, str(error.status), started)
        yield "data: " + json.dumps(error.content()) + "\n\n"
    yield "data: [DONE]\n\n"
