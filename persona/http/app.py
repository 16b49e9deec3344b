"""The OpenAI-compatible HTTP server: ``persona serve``.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or SSE streaming),
``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /healthz`` (no auth), ``GET /metrics``
(Prometheus text format). What the server does with each OpenAI request field (supported, refused
with a 400 naming it, or ignored by design) is the table in ``persona.openai_schema``.

``model`` names what serves the request: an adapter reference (``user:alice``, ``user:alice@v2``), a
stack (``user:alice+domain:finance``), weighted per part (``user:alice+domain:finance*0.5``), with
``domain:auto`` for the router's choice, or the base's name for no adapter. Responses echo ``model``
as sent. An unknown adapter, or a part of a stack the caller's token may not reach, is a 404 (the same answer, so a token cannot probe for users);
the server never falls back to the base model. Concurrent requests are batched together across
adapters by the engine's worker. The server is thin: it validates, authorizes, submits to the
engine, and formats OpenAI-shaped responses and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass, replace
from typing import Annotated, Any, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .admission import AdmissionGate
from ..store.tokens import AuthError, Scope, TokenStore
from ..serving.scheduler import when_all_done
from ..errors import (
    AdapterNotFound,
    InvalidConfig,
    InvalidInteractions,
    InvalidPrompt,
    InvalidReference,
    InvalidResponseFormat,
    NoDomainToRoute,
    Overloaded,
    PersonaError,
    VersionNotFound,
)
from .openai_schema import chat_logprobs, completion_logprobs, refusal
from ..refs import parse_stack

MAX_TOKENS_LIMIT = 4096
MAX_N = 16  # choices per request: n rows of the batch
MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any prompt the embedded base's context holds (issue 10)
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- schemas
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, str):
            return v
        texts = []
        for j, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"content part {j} is {part.get('type')!r}: only text parts "
                                 "({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins them

    def for_engine(self) -> dict[str, str]:
        message = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # ignored: no padding is added to chunks


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # output always follows the schema, strict or not


class ResponseFormatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Common(BaseModel):
    # Fields outside the declared ones are checked against persona.openai_schema.REQUEST_FIELDS:
    # refused with a 400 naming them, or ignored by design; never silently dropped.
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=1024)
    # strict=True on every number: a JSON true is not 1 (strict still takes an integer for a float)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, strict=True)
    n: int = Field(default=1, ge=1, le=MAX_N, strict=True)
    logit_bias: dict[str, Annotated[float, Strict()]] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    response_format: ResponseFormatBody | None = None


class CompletionRequest(_Common):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)


# ---------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


class _AsciiJSON(JSONResponse):
    # An error message may quote the client's input, lone surrogates included: escaped, it always encodes.
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error_body(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return _AsciiJSON(status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}},
                      headers=headers)


def _not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist or you do not have access to it.", "invalid_request_error", "model_not_found", "model")


# ---------------------------------------------------------------------------------------- app
@dataclass
class ServerConfig:
    auth: bool = True
    log_interactions: bool = False
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_body_bytes: int = MAX_BODY_BYTES  # a larger body is a 413, refused before it is read
    max_queue: int = 64  # requests in the engine (running or waiting); one more is a 429 with Retry-After
    max_per_token: int = 8  # requests in the engine per token (not applied with auth off)
    retry_after_s: int = 1  # the Retry-After of a 429
    drain_timeout_s: float = 5.0  # on SIGTERM: how long in-flight requests may finish before they are cancelled


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app over an :class:`~persona.engine.Engine` (which holds the store and the base)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    config = config or ServerConfig()
    store = engine.store
    tokens = TokenStore(store)
    app = FastAPI(title="persona", version="1", docs_url=None, redoc_url=None)

    registry = CollectorRegistry()
    requests_total = Counter("persona_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    tokens_total = Counter("persona_tokens", "Tokens processed", ["kind"], registry=registry)
    latency = Histogram("persona_request_seconds", "Request latency (completion routes)", ["route"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
    gate = AdmissionGate(config.max_queue, config.max_per_token)
    app.state.gate = gate
    registry.register(_EngineCollector(engine, gate))  # engine totals are read at scrape time, as counters

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        requests_total.labels(_route_label(request.scope), str(exc.status)).inc()
        return _error_body(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        requests_total.labels(_route_label(request.scope), "400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request body")
        if first.get("type") == "json_invalid":  # its loc ends in a byte offset, not a field: no param
            message, where = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", ""
        elif not where:  # the body as a whole: not an object, or not sent as JSON (curl -d sends a form)
            sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
            message = "the body must be a JSON object" + (
                "" if sent == "application/json" else "; send Content-Type: application/json")
        return _error_body(400, message, "invalid_request_error", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        requests_total.labels(_route_label(request.scope), str(exc.status_code)).inc()
        return _error_body(exc.status_code, str(exc.detail), "invalid_request_error")

    def authorize(request: Request) -> Scope | None:
        if not config.auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            return tokens.authenticate(token.strip() if scheme.lower() == "bearer" else None)
        except AuthError as exc:
            raise ApiError(401, f"{exc}: send Authorization: Bearer <token> (issue one with `persona token create`)",
                           "authentication_error", "invalid_api_key") from None

    def check(model: str, scope: Scope | None) -> None:
        """400 for a malformed model, 404 for unknown adapters or any part the token may not reach."""
        if model == engine.base_name:
            return
        try:
            parts = parse_stack(model)
        except InvalidReference as exc:
            raise ApiError(400, f"invalid model {model!r}: {exc}", "invalid_request_error", "invalid_model", "model") from None
        if scope is not None and not scope.allows(parts):  # every part, whatever its weight
            raise _not_found(model)
        try:
            pinned = engine.check(model)  # pins the named parts and their layers; domain:auto is routed at admission
        except (AdapterNotFound, VersionNotFound):
            raise _not_found(model) from None
        except PersonaError as exc:
            raise ApiError(400, f"invalid model {model!r}: {exc}", "invalid_request_error", "invalid_model", "model") from None
        if scope is not None and not scope.allows(pinned):  # a layered adapter's layer runs too (merged: admin only)
            raise _not_found(model)

    def sampling(body: _Common):
        from ..serving.engine import SamplingParams

        if body.limit() > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {body.limit()}; this server allows at most {config.max_tokens_limit}",
                           "invalid_request_error", "max_tokens_too_large", "max_tokens")
        if isinstance(body, ChatRequest):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        try:
            return SamplingParams(max_new_tokens=body.limit(), temperature=body.temperature, top_p=body.top_p,
                                  stop=tuple(body.stop or ()), seed=body.seed, logprobs=logprobs,
                                  logit_bias=tuple((body.logit_bias or {}).items()),
                                  response_format=response_format(body))
        except InvalidConfig as exc:
            first = str(exc).split(" ", 1)[0]
            param = first if first in type(body).model_fields else None  # messages start with the field's name
            raise ApiError(400, str(exc), "invalid_request_error", param=param) from None

    def response_format(body: _Common):
        from ..serving.constrain import ResponseFormat

        fmt = getattr(body, "response_format", None)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ResponseFormat.json_object()
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format of type json_schema needs json_schema.schema",
                           "invalid_request_error", param="response_format")
        try:
            return ResponseFormat.from_schema(fmt.json_schema.schema_)
        except InvalidConfig as exc:
            raise ApiError(400, str(exc), "invalid_request_error", param="response_format") from None

    def refuse_unsupported(body: _Common, endpoint: Literal["chat", "completions"]) -> None:
        """A 400 naming the first field persona does not implement (see openai_schema.REQUEST_FIELDS)."""
        for name, value in (body.model_extra or {}).items():
            why = refusal(endpoint, name, value)
            if why is not None:
                raise ApiError(400, why, "invalid_request_error", "unsupported_parameter", name)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "invalid_request_error",
                           param="stream_options")
        if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request_error", param="top_logprobs")
        vocab = engine.vocabulary.vocab_size
        for token in body.logit_bias or {}:
            if not token.isascii() or not token.isdigit() or int(token) >= vocab:
                raise ApiError(400, f"logit_bias: {token!r} is not a token id of this base (0..{vocab - 1})",
                               "invalid_request_error", param="logit_bias")

    def submit(request_obj):
        try:
            return engine.submit(request_obj)
        except NoDomainToRoute as exc:  # check() let every part through for this caller: nothing left to hide
            raise ApiError(400, str(exc), "invalid_request_error", "invalid_model", "model") from None
        except (AdapterNotFound, VersionNotFound):
            raise _not_found(request_obj.model) from None
        except InvalidResponseFormat as exc:
            raise ApiError(400, str(exc), "invalid_request_error", param="response_format") from None
        except InvalidPrompt as exc:
            raise ApiError(400, str(exc), "invalid_request_error",
                           param="messages" if request_obj.messages is not None else "prompt") from None
        except PersonaError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from None

    def submit_choices(gen, n: int) -> list:
        """n rows of the same request (one per choice); with a seed, choice i > 0 gets a derived seed."""
        handles = []
        try:
            for i in range(n):
                params = gen.params
                if i > 0 and params.seed is not None:
                    params = replace(params, seed=_derived_seed(params.seed, i))
                handles.append(submit(replace(gen, params=params)))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    # ------------------------------------------------------------------ limits (issue 10)
    longest_token: list[int] = []  # characters of the vocabulary's longest token, read on first use

    def max_token_chars() -> int:
        if not longest_token:
            longest_token.append(max((len(t) for t in engine.tokenizer.get_vocab()), default=1))
        return longest_token[0]

    def refuse_unencodable(body: _Common) -> None:
        """A lone surrogate (valid JSON: ``"\\ud800"``) is no text a tokenizer can take: 400 naming where."""
        where = _lone_surrogate(body.model_dump(exclude_none=True))
        if where is not None:
            raise ApiError(400, f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text: "
                                "send well-formed UTF-8", "invalid_request_error", "invalid_unicode", where)

    def check_prompt_size(body: _Common, chat: bool) -> None:
        """Refuse a prompt that cannot fit the context before tokenizing it (issue 10: a 20 MB chat
        once held the tokenizer for seconds). No token covers more than ``max_token_chars()``
        characters, so more than ``context x max_token_chars()`` characters is more tokens than fit."""
        chars = _prompt_chars(body.model_dump(exclude_none=True)["messages"] if chat else body.prompt)
        if chars > engine.context_length * max_token_chars():
            raise ApiError(400, f"the prompt has {chars} characters: more than the base's context of "
                                f"{engine.context_length} tokens can hold", "invalid_request_error",
                           "context_length_exceeded", "messages" if chat else "prompt")

    limiters: dict[str, Any] = {}

    def limiter(name: str, tokens: int):
        import anyio

        if name not in limiters:  # made on first use: a limiter belongs to the running event loop
            limiters[name] = anyio.CapacityLimiter(tokens)
        return limiters[name]

    async def admit(scope: Scope | None, gen, n: int) -> list:
        """Take a place in the gate (429 when full), then check the model and tokenize off the event
        loop (n rows, one per choice); the place is held until the engine ends every row."""
        import anyio

        try:
            ticket = gate.admit(scope.token_id if scope is not None else None)
        except Overloaded as exc:
            raise ApiError(429, str(exc), "requests", "rate_limit_exceeded",
                           headers={"Retry-After": str(config.retry_after_s)}) from None
        submitted: list = []

        def work():
            check(gen.model, scope)
            submitted.extend(submit_choices(gen, n))
            return list(submitted)

        try:
            handles = await anyio.to_thread.run_sync(work, limiter=limiter("admission", 4))
        except BaseException:
            if submitted:  # cancelled while the thread ran: the request is in the engine, stop it there
                ticket.watch(*submitted)
                for handle in submitted:
                    handle.cancel()
            else:
                ticket.release()
            raise
        ticket.watch(*handles)
        return handles

    async def stream_unless_gone(request: Request, handles, chunks: Iterator[str], route: str, started: float):
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
                                                       limiter=limiter("streams", config.max_queue + 8))
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
                record(route, status, started)

    def log_chat(model: str, messages: list[dict[str, str]], answer: str) -> None:
        if not config.log_interactions or not answer.strip():
            return
        users = [p.ref for p in parse_stack(model) if p.ref.kind == "user"] if model != engine.base_name else []
        if len(users) != 1:
            return
        from ..interactions import Interaction
        from ..training.trainer import log_interactions

        try:
            interaction = Interaction.from_json({"messages": messages + [{"role": "assistant", "content": answer}]},
                                                source="server", line=1)
            log_interactions(store, users[0].unpinned(), [interaction])
        except (InvalidInteractions, PersonaError):
            pass  # logging is best effort; the answer was served

    async def complete(route: str, body: _Common, request: Request, *, chat: bool):
        from ..serving.engine import GenerationRequest

        started = time.perf_counter()
        scope = authorize(request)
        refuse_unsupported(body, "chat" if chat else "completions")
        refuse_unencodable(body)
        params = sampling(body)
        check_prompt_size(body, chat)
        messages = [m.for_engine() for m in body.messages] if chat else None
        gen = GenerationRequest(model=body.model, prompt=None if chat else body.prompt,
                                messages=tuple(messages) if chat else None, params=params)
        handles = await admit(scope, gen, body.n)
        if chat:  # the interaction log keeps OpenAI's plain form: developer as system, no names
            messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                        for m in messages]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_unless_gone(request, handles,
                                   _sse(handles, rid, created, body.model, chat, route, started, messages, usage),
                                   route, started),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            )
        try:
            results = await _results_unless_gone(request, handles)
        except _ClientGone:
            record(route, "499", started)  # nginx's "client closed request": nobody reads this answer
            return Response(status_code=499)
        except CancelledError:
            raise ApiError(503, "the server is stopping; the request was cancelled", "server_error", "server_stopping",
                           headers={"Retry-After": str(config.retry_after_s)}) from None
        except PersonaError as exc:
            for handle in handles:
                handle.cancel()
            raise ApiError(400, str(exc), "invalid_request_error") from None
        total = _total(results)
        record(route, "200", started, total)
        if chat:
            log_chat(body.model, messages, results[0].text)  # one interaction per request, whatever n
        choices = []
        for i, result in enumerate(results):
            logprobs = None
            if result.logprobs is not None:
                logprobs = chat_logprobs(result.logprobs) if chat else completion_logprobs(result.logprobs)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": result.text},
                                "logprobs": logprobs, "finish_reason": result.finish_reason})
            else:
                choices.append({"index": i, "text": result.text, "finish_reason": result.finish_reason,
                                "logprobs": logprobs})
        return {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": body.model,
            "choices": choices, "usage": _usage(total),
        }

    def record(route: str, status: str, started: float, result=None) -> None:
        requests_total.labels(route, status).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        if result is not None:
            tokens_total.labels("prompt").inc(result.prompt_tokens)
            tokens_total.labels("completion").inc(result.completion_tokens)

    def _sse(handles, rid, created, model, chat, route, started, messages, include_usage=False) -> Iterator[str]:
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
            total = _total([h.result() for h in handles])
            if include_usage:
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                             "choices": [], "usage": _usage(total)}) + "\n\n"
            record(route, "200", started, total)
            if chat:
                log_chat(model, messages, "".join(pieces))
        except PersonaError as exc:
            record(route, "500", started)
            yield "data: " + json.dumps({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "base": engine.base_name}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        scope = authorize(request)
        created = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "persona"}]
        for adapter in store.list():
            if not adapter.versions:  # nothing readable to serve (a symlinked folder, every version damaged)
                continue
            # what the current version runs: the adapter and, if it is layered, its layer
            layers = [v.over_ref for v in adapter.versions if v.version == adapter.current and v.over]
            runs = [*parse_stack(adapter.adapter), *layers]
            if scope is None or scope.allows(runs):
                data.append({"id": adapter.adapter, "object": "model", "created": created, "owned_by": "persona",
                             "current_version": adapter.current})
        requests_total.labels("/v1/models", "200").inc()
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str, request: Request):
        # Same scoping as /v1/models: an adapter the token may not reach is a 404, like an unknown one.
        scope = authorize(request)
        created = int(time.time())
        if model == engine.base_name:
            requests_total.labels("/v1/models/{model}", "200").inc()
            return {"id": model, "object": "model", "created": created, "owned_by": "persona"}
        for adapter in store.list():
            if adapter.adapter != model:
                continue
            # as /v1/models: what the current version runs, the adapter and, if it is layered, its layer
            layers = [v.over_ref for v in adapter.versions if v.version == adapter.current and v.over]
            if scope is None or scope.allows([*parse_stack(adapter.adapter), *layers]):
                requests_total.labels("/v1/models/{model}", "200").inc()
                return {"id": adapter.adapter, "object": "model", "created": created, "owned_by": "persona",
                        "current_version": adapter.current}
        raise _not_found(model)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await complete("/v1/chat/completions", body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete("/v1/completions", body, request, chat=False)

    def refuse_early(scope) -> ApiError | None:
        """What the guard answers before the route runs: 401 (authentication comes before body
        validation: without a valid token every route but /healthz answers 401, whatever the body),
        then 413 for a declared body over the cap."""
        if config.auth and scope["path"] != "/healthz":
            try:
                authorize(Request(scope))
            except ApiError as exc:
                return exc
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > config.max_body_bytes):
            return _too_large(config.max_body_bytes)
        return None

    def count(scope, status: int) -> None:
        requests_total.labels(_route_label(scope), str(status)).inc()

    app.add_middleware(_Guard, refuse_early=refuse_early, count=count, max_body_bytes=config.max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # After uvicorn's graceful drain (--drain-timeout): whatever is still in the engine stops at its next step.
        gate.cancel_all()

    app.router.lifespan_context = lifespan
    return app


def _derived_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: a hash of (seed, index), so choices differ and each is reproducible."""
    digest = hashlib.sha256(f"persona-choice:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # in [0, 2**63)


def _total(results):
    """One result carrying the request's usage: the prompt once, every choice's completion tokens."""
    return replace(results[0], completion_tokens=sum(r.completion_tokens for r in results))


def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


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


# ---------------------------------------------------------------------------------------- guard
_END = object()


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _route_label(scope) -> str:
    """The route template a request matched (``/v1/models``), or ``unmatched``: metrics labels stay
    a fixed set, whatever paths clients send (issue 10: 20,000 random paths grew /metrics to 425 MB)."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", "unmatched")
    return "unmatched"


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
                    "invalid_request_error", "request_too_large")


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The dotted path of the first string holding a lone surrogate (``messages.0.content``), else None."""
    if isinstance(value, str):
        return (where or "body") if _has_lone_surrogate(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _has_lone_surrogate(text: str) -> bool:
    if text.isascii():  # the common case, answered without reading the string again
        return False
    try:
        text.encode("utf-8")  # C speed; a regex over a 4 MB body held the event loop for 120 ms
    except UnicodeEncodeError:
        return True
    return False


def _prompt_chars(value: Any, key: str = "content") -> int:
    """Characters of what a prompt renders: a completion's prompt, or every message's ``content``
    (a string, or text parts)."""
    if isinstance(value, str):
        return len(value) if key in ("content", "text") else 0
    if isinstance(value, dict):
        return sum(_prompt_chars(v, k) for k, v in value.items())
    if isinstance(value, list):
        return sum(_prompt_chars(v, key) for v in value)
    return 0


async def _client_gone(receive) -> None:
    """Return when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    try:
        loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
    except RuntimeError:  # the loop has closed: nobody waits for this request any more
        pass


async def _results_unless_gone(request: Request, handles) -> list:
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
        raise _ClientGone()
    return [h.result(timeout=0) for h in handles]


class _EngineCollector:
    """Engine totals as Prometheus counters (monotonic since start), residency and load as gauges."""

    def __init__(self, engine, gate: AdmissionGate):
        self.engine, self.gate = engine, gate

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        yield GaugeMetricFamily("persona_resident_adapters", "Adapters resident in engine slots", value=len(stats.resident))
        yield GaugeMetricFamily("persona_requests_in_flight", "Requests admitted to the engine and not finished",
                                value=self.gate.in_flight)
        yield CounterMetricFamily("persona_adapter_loads", "Adapter loads from disk since start", value=stats.loads)
        yield CounterMetricFamily("persona_adapter_evictions", "Adapter slot evictions since start", value=stats.evictions)
        yield CounterMetricFamily("persona_adapter_cpu_hits", "Adapter loads served by the CPU tier", value=stats.cpu_hits)
        yield CounterMetricFamily("persona_requests_cancelled", "Requests cancelled in the engine (client gone, shutdown)",
                                  value=stats.cancelled)


class _Guard:
    """Pure ASGI middleware in front of every route: 401 before anything else, the body-size cap,
    and one OpenAI-shaped JSON 500 for any unhandled error (logged here with its traceback).

    Not ``BaseHTTPMiddleware``: that would stand between the routes and the client's disconnect
    and re-buffer streamed responses.
    """

    def __init__(self, app, *, refuse_early, count, max_body_bytes: int):
        self.app, self.refuse_early, self.count, self.max_body_bytes = app, refuse_early, count, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refused = self.refuse_early(scope)
            if refused is not None:
                return await self._answer(scope, receive, send, refused)
            if "content-length" not in Headers(scope=scope) and scope["method"] in ("POST", "PUT", "PATCH"):
                replay = await self._buffer_chunked(receive)  # no declared length: count it as it comes
                if replay is None:
                    return await self._answer(scope, receive, send, _too_large(self.max_body_bytes))
                receive = replay
            await self.app(scope, receive, tracked_send)
        except Exception:  # noqa: BLE001 - whatever escaped every handler: logged here, never sent to the client
            log.exception("unhandled error on %s %s", scope["method"], _route_label(scope))
            if started:  # the status line is out: end the body cleanly rather than reset the connection
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception:  # noqa: BLE001 - the client may be gone
                    pass
                return
            await self._answer(scope, receive, send, ApiError(
                500, "internal server error (logged by the server)", "server_error", "internal_error"))

    async def _buffer_chunked(self, receive):
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive():
            return replay.pop() if replay else await receive()

        return replaying_receive

    async def _answer(self, scope, receive, send, error: ApiError) -> None:
        self.count(scope, error.status)
        response = _error_body(error.status, error.message, error.type, error.code, error.param, error.headers)
        await response(scope, receive, send)


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
                log_level: str = "info"):
    """A ``uvicorn.Server`` for the app; on SIGTERM/SIGINT it stops taking connections, lets in-flight
    requests finish for ``config.drain_timeout_s`` seconds, then cancels them (their engine rows stop
    at the next decode step) and exits."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # At the deadline the engine rows stop, so every response still ends well-formed (a 503, or
            # an error event and [DONE]); uvicorn's own timeout, a little later, is the backstop.
            deadline = asyncio.get_running_loop().call_later(config.drain_timeout_s, app.state.gate.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    config = config or ServerConfig()
    app = create_app(engine, config)
    return DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=config.drain_timeout_s + 2))


def serve(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process; the engine batches across requests)."""
    make_server(engine, host, port, config).run()
