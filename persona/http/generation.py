"""From a validated completion body to rows in the engine: refuse what persona does not implement,
build the :class:`~persona.serving.engine.GenerationRequest`, check the model against the caller's
scope, take a place in the admission gate and submit one row per choice.

Refusals raise library errors (mostly :class:`~persona.errors.InvalidRequest` naming the field);
their status comes from the error table, through the app's one handler.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Literal

from ..errors import (
    AdapterNotFound,
    InvalidConfig,
    InvalidPrompt,
    InvalidReference,
    InvalidRequest,
    InvalidResponseFormat,
    NoDomainToRoute,
    PersonaError,
    VersionNotFound,
    mapping_for,
)
from ..refs import parse_stack
from ..store.tokens import Scope
from .openai_schema import refusal
from .schemas import ChatRequest, CompletionCommon
from .state import ServerState


def not_found(model: str) -> AdapterNotFound:
    """The one answer for an unknown adapter and for one the token may not reach (a 404 either way,
    so a token cannot probe for users)."""
    return AdapterNotFound(f"The model {model!r} does not exist or you do not have access to it.")


# ------------------------------------------------------------------------------ the request itself
def refuse_unsupported(state: ServerState, body: CompletionCommon, endpoint: Literal["chat", "completions"]) -> None:
    """A 400 naming the first field persona does not implement (see openai_schema.REQUEST_FIELDS)."""
    for name, value in (body.model_extra or {}).items():
        why = refusal(endpoint, name, value)
        if why is not None:
            raise InvalidRequest(why, param=name, code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
    if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")


def refuse_unknown_token_ids(state: ServerState, body: CompletionCommon) -> None:
    """A 400 for a ``logit_bias`` key that is not a token id of the engine's base."""
    vocab = state.engine.vocabulary.vocab_size
    for token in body.logit_bias or {}:
        if not token.isascii() or not token.isdigit() or int(token) >= vocab:
            raise InvalidRequest(f"logit_bias: {token!r} is not a token id of this base (0..{vocab - 1})",
                                 param="logit_bias")


def refuse_unencodable(body: CompletionCommon) -> None:
    """A lone surrogate (valid JSON: ``"\\ud800"``) is no text a tokenizer can take: 400 naming where."""
    where = _lone_surrogate(body.model_dump(exclude_none=True))
    if where is not None:
        raise InvalidRequest(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode text: "
                             "send well-formed UTF-8", param=where, code="invalid_unicode")


def check_prompt_size(state: ServerState, body: CompletionCommon, chat: bool) -> None:
    """Refuse a prompt that cannot fit the context before tokenizing it (issue 10: a 20 MB chat
    once held the tokenizer for seconds). No token covers more than ``max_token_chars()``
    characters, so more than ``context x max_token_chars()`` characters is more tokens than fit."""
    chars = _prompt_chars(body.model_dump(exclude_none=True)["messages"] if chat else body.prompt)
    context = state.engine.context_length
    if chars > context * state.max_token_chars():
        raise InvalidRequest(f"the prompt has {chars} characters: more than the base's context of {context} tokens "
                             "can hold", param="messages" if chat else "prompt", code="context_length_exceeded")


def sampling(state: ServerState, body: CompletionCommon, *, compile_format: bool = True):
    """The body's :class:`~persona.serving.engine.SamplingParams` (400 naming the field at fault).

    ``compile_format=False`` (the gateway, whose upstream compiles it): ``response_format`` is left out."""
    from ..serving.sampling import SamplingParams

    limit = state.config.max_tokens_limit
    if body.limit() > limit:
        raise InvalidRequest(f"max_tokens is {body.limit()}; this server allows at most {limit}",
                             param="max_tokens", code="max_tokens_too_large")
    logprobs = ((body.top_logprobs or 0) if body.logprobs else None) if isinstance(body, ChatRequest) else body.logprobs
    fmt = response_format(body) if compile_format else None
    try:
        return SamplingParams(max_new_tokens=body.limit(), temperature=body.temperature, top_p=body.top_p,
                              stop=tuple(body.stop or ()), seed=body.seed, logprobs=logprobs,
                              logit_bias=tuple((body.logit_bias or {}).items()), response_format=fmt)
    except InvalidConfig as exc:
        first = str(exc).split(" ", 1)[0]
        param = first if first in type(body).model_fields else None  # messages start with the field's name
        raise InvalidRequest(str(exc), param=param) from None


def response_format(body: CompletionCommon):
    from ..serving.constrain import ResponseFormat

    fmt = getattr(body, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat.json_object()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidResponseFormat("response_format of type json_schema needs json_schema.schema")
    try:
        return ResponseFormat.from_schema(fmt.json_schema.schema_)
    except InvalidConfig as exc:
        raise InvalidResponseFormat(str(exc)) from None


def generation_request(state: ServerState, body: CompletionCommon, chat: bool):
    """Every check that needs no tokenizer, then the engine's request for one choice."""
    from ..serving.requests import GenerationRequest

    refuse_unsupported(state, body, "chat" if chat else "completions")
    refuse_unknown_token_ids(state, body)
    refuse_unencodable(body)
    params = sampling(state, body)
    check_prompt_size(state, body, chat)
    messages = tuple(m.for_engine() for m in body.messages) if chat else None
    return GenerationRequest(model=body.model, prompt=None if chat else body.prompt, messages=messages, params=params,
                             memory=body.memory if isinstance(body, ChatRequest) else None)


def resolved_body(state: ServerState, gen, handles) -> dict | None:
    """``resolved`` of a chat answer when memory was in play for it: the pinned stack and the memory ids
    put in the prompt (docs/MEMORY.md); None otherwise, so answers without memory keep OpenAI's shape."""
    config = getattr(state.engine, "memory", None)  # the gateway has none: its upstream decides
    wanted = gen.memory if gen.memory is not None else bool(config is not None and config.default)
    if gen.messages is None or not wanted or not handles:
        return None
    return {"adapters": list(handles[0].resolved), "memories": list(handles[0].memories)}


# -------------------------------------------------------------------------- the model and the engine
def check_model(state: ServerState, model: str, scope: Scope | None) -> tuple:
    """400 for a malformed model, 404 for unknown adapters or any part the token may not reach;
    the pinned parts (every part but ``domain:auto``, layers included; ``()`` for the base)."""
    engine = state.engine
    if model == engine.base_name:
        return ()
    try:
        parts = parse_stack(model)
    except InvalidReference as exc:
        raise InvalidReference(f"invalid model {model!r}: {exc}") from None
    if scope is not None and not scope.allows(parts):  # every part, whatever its weight
        raise not_found(model)
    try:
        pinned = engine.check(model)  # pins the named parts and their layers; domain:auto is routed at admission
    except (AdapterNotFound, VersionNotFound):
        raise not_found(model) from None
    except PersonaError as exc:
        if mapping_for(exc).http_status != 400:  # the server's fault, or busy: the table answers as it is
            raise
        raise InvalidRequest(f"invalid model {model!r}: {exc}", param="model", code="invalid_model") from None
    if scope is not None and not scope.allows(pinned):  # a layered adapter's layer runs too (merged: admin only)
        raise not_found(model)
    return pinned


def submit(state: ServerState, request):
    try:
        return state.engine.submit(request)
    except NoDomainToRoute:  # check_model let every part through for this caller: nothing left to hide
        raise
    except (AdapterNotFound, VersionNotFound):
        raise not_found(request.model) from None
    except InvalidPrompt as exc:
        raise InvalidPrompt(str(exc), param="messages" if request.messages is not None else "prompt") from None


def submit_choices(state: ServerState, request, n: int) -> list:
    """n rows of the same request (one per choice); with a seed, choice i > 0 gets a derived seed."""
    handles = []
    try:
        for i in range(n):
            params = request.params
            if i > 0 and params.seed is not None:
                params = replace(params, seed=derived_seed(params.seed, i))
            handles.append(submit(state, replace(request, params=params)))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def admit(state: ServerState, scope: Scope | None, request, n: int) -> list:
    """Take a place in the gate (429 when full), then check the model and tokenize off the event
    loop (n rows, one per choice); the place is held until the engine ends every row."""
    import anyio

    ticket = state.gate.admit(scope.token_id if scope is not None else None)  # Overloaded: 429
    submitted: list = []

    def work():
        check_model(state, request.model, scope)
        submitted.extend(submit_choices(state, request, n))
        return list(submitted)

    try:
        handles = await anyio.to_thread.run_sync(work, limiter=state.limiter("admission", 4))
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


def derived_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: a hash of (seed, index), so choices differ and each is reproducible."""
    digest = hashlib.sha256(f"persona-choice:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # in [0, 2**63)


# ---------------------------------------------------------------------------------------- helpers
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
