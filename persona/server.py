"""The OpenAI-compatible HTTP server: ``persona serve``.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON or SSE streaming),
``GET /v1/models``, ``GET /healthz`` (no auth), ``GET /metrics`` (Prometheus text format).

``model`` names what serves the request: an adapter reference (``user:alice``, ``user:alice@v2``), a
stack (``user:alice+domain:finance``), weighted per part (``user:alice+domain:finance*0.5``), with
``domain:auto`` for the router's choice, or the base's name for no adapter. Responses echo ``model``
as sent. An unknown adapter, or a part of a stack the caller's token may not reach, is a 404 (the same answer, so a token cannot probe for users);
the server never falls back to the base model. Concurrent requests are batched together across
adapters by the engine's worker. The server is thin: it validates, authorizes, submits to the
engine, and formats OpenAI-shaped responses and errors.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import AuthError, Scope, TokenStore
from .errors import AdapterNotFound, InvalidConfig, InvalidInteractions, InvalidReference, PersonaError, VersionNotFound
from .refs import parse_stack

MAX_TOKENS_LIMIT = 4096


# ---------------------------------------------------------------------------------------- schemas
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    # OpenAI clients send optional fields persona does not use (user, stream_options, ...): ignored.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)

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


class CompletionRequest(_Common):
    prompt: str


# ---------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error_body(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist or you do not have access to it.", "invalid_request_error", "model_not_found", "model")


# ---------------------------------------------------------------------------------------- app
@dataclass
class ServerConfig:
    auth: bool = True
    log_interactions: bool = False
    max_tokens_limit: int = MAX_TOKENS_LIMIT


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app over an :class:`~persona.engine.Engine` (which holds the store and the base)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    config = config or ServerConfig()
    store = engine.store
    tokens = TokenStore(store)
    app = FastAPI(title="persona", version="1", docs_url=None, redoc_url=None)

    registry = CollectorRegistry()
    requests_total = Counter("persona_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    tokens_total = Counter("persona_tokens", "Tokens processed", ["kind"], registry=registry)
    latency = Histogram("persona_request_seconds", "Request latency (completion routes)", ["route"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
    resident = Gauge("persona_resident_adapters", "Adapters resident in engine slots", registry=registry)
    loads = Gauge("persona_adapter_loads", "Adapter loads from disk since start", registry=registry)
    evictions = Gauge("persona_adapter_evictions", "Adapter slot evictions since start", registry=registry)
    cpu_hits = Gauge("persona_adapter_cpu_hits", "Adapter loads served by the CPU tier", registry=registry)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        requests_total.labels(request.url.path, str(exc.status)).inc()
        return _error_body(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        requests_total.labels(request.url.path, "400").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request body")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return _error_body(400, message, "invalid_request_error", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        requests_total.labels(request.url.path, str(exc.status_code)).inc()
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
        from .engine import SamplingParams

        if body.limit() > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {body.limit()}; this server allows at most {config.max_tokens_limit}",
                           "invalid_request_error", "max_tokens_too_large", "max_tokens")
        try:
            return SamplingParams(max_new_tokens=body.limit(), temperature=body.temperature, top_p=body.top_p,
                                  stop=tuple(body.stop or ()), seed=body.seed)
        except InvalidConfig as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from None

    def submit(request_obj):
        try:
            return engine.submit(request_obj)
        except (AdapterNotFound, VersionNotFound):
            raise _not_found(request_obj.model) from None
        except PersonaError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from None

    def log_chat(model: str, messages: list[dict[str, str]], answer: str) -> None:
        if not config.log_interactions or not answer.strip():
            return
        users = [p.ref for p in parse_stack(model) if p.ref.kind == "user"] if model != engine.base_name else []
        if len(users) != 1:
            return
        from .data import Interaction
        from .train import log_interactions

        try:
            interaction = Interaction.from_json({"messages": messages + [{"role": "assistant", "content": answer}]},
                                                source="server", line=1)
            log_interactions(store, users[0].unpinned(), [interaction])
        except (InvalidInteractions, PersonaError):
            pass  # logging is best effort; the answer was served

    async def complete(route: str, body: _Common, request: Request, *, chat: bool):
        from .engine import GenerationRequest

        started = time.perf_counter()
        scope = authorize(request)
        check(body.model, scope)
        params = sampling(body)
        messages = [m.model_dump() for m in body.messages] if chat else None
        gen = GenerationRequest(model=body.model, prompt=None if chat else body.prompt,
                                messages=tuple(messages) if chat else None, params=params)
        handle = submit(gen)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                _sse(handle, rid, created, body.model, chat, route, started, messages),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            )
        try:
            result = await run_in_threadpool(handle.result)
        except PersonaError as exc:
            raise ApiError(400, str(exc), "invalid_request_error") from None
        record(route, "200", started, result)
        if chat:
            log_chat(body.model, messages, result.text)
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": body.model,
            "choices": [choice],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    def record(route: str, status: str, started: float, result=None) -> None:
        requests_total.labels(route, status).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        if result is not None:
            tokens_total.labels("prompt").inc(result.prompt_tokens)
            tokens_total.labels("completion").inc(result.completion_tokens)

    def _sse(handle, rid, created, model, chat, route, started, messages) -> Iterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}) + "\n\n"

        pieces: list[str] = []
        try:
            if chat:
                yield chunk(None, None, first=True)
            for delta in handle.stream():
                pieces.append(delta)
                yield chunk(delta, None)
            result = handle.result()
            yield chunk(None, result.finish_reason)
            record(route, "200", started, result)
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
        stats = engine.stats()
        resident.set(len(stats.resident))
        loads.set(stats.loads)
        evictions.set(stats.evictions)
        cpu_hits.set(stats.cpu_hits)
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        scope = authorize(request)
        created = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "persona"}]
        for adapter in store.list():
            # what the current version runs: the adapter and, if it is layered, its layer
            layers = [v.over_ref for v in adapter.versions if v.version == adapter.current and v.over]
            runs = [*parse_stack(adapter.adapter), *layers]
            if scope is None or scope.allows(runs):
                data.append({"id": adapter.adapter, "object": "model", "created": created, "owned_by": "persona",
                             "current_version": adapter.current})
        requests_total.labels("/v1/models", "200").inc()
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await complete("/v1/chat/completions", body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete("/v1/completions", body, request, chat=False)

    @app.middleware("http")
    async def _auth_first(request: Request, call_next):
        # Authentication comes before body validation: without a valid token every route but
        # /healthz answers 401, whatever the body.
        if config.auth and request.url.path != "/healthz":
            try:
                authorize(request)
            except ApiError as exc:
                requests_total.labels(request.url.path, "401").inc()
                return _error_body(exc.status, exc.message, exc.type, exc.code)
        return await call_next(request)

    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None) -> None:
    """Run the server until interrupted (uvicorn, one process; the engine batches across requests)."""
    import uvicorn

    uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")
