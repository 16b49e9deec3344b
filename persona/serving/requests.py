"""What crosses the serving package's module lines: a request, its result, its handle, an admitted job.

``GenerationRequest`` (validated at construction) goes in; ``Engine`` admits it into a ``Job``
(pinned adapters, prompt tokens, budget) with a ``Handle``; the scheduler and the decode loop finish
or fail that handle with a ``GenerationResult``. Nothing here runs a model.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

from ..errors import InvalidConfig, InvalidReference
from ..interactions import ROLES as CHAT_ROLES, SYSTEM_ALIAS
from ..refs import AdapterRef, StackPart
from .sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from .constrain import RowGrammar

__all__ = [
    "Delta",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "Handle",
    "Job",
    "JobTimes",
    "ServingTimes",
    "cancelled_error",
    "when_all_done",
]

ROLES = (*CHAT_ROLES, SYSTEM_ALIAS, "tool")  # the alias is rendered as system; tool turns go to the template as given
FinishReason = Literal["stop", "length"]
_END = object()  # the last event of a handle's stream


@dataclass(frozen=True)
class GenerationRequest:
    """One request: which model, a prompt or chat messages, and how to sample.

    ``model`` is an adapter reference (``user:alice``, ``user:alice@v2``), a stack
    (``user:alice+domain:finance``), optionally weighted per part (``user:alice+domain:finance*0.5``)
    and with ``domain:auto`` for the router's choice, or ``Engine.base_name``. Exactly one of ``prompt`` (raw text,
    tokenized as is) and ``messages`` (OpenAI-style ``{"role", "content"}`` dicts, rendered with the
    base tokenizer's chat template and a generation prompt) is given. A message may carry a ``name``
    (passed to the template, which may ignore it); the ``developer`` role is rendered as ``system``.
    ``memory``: put the user adapters' best memories in a system message (True), not (False), or as
    the engine's :class:`~persona.serving.memory.MemoryConfig` says (None; see docs/MEMORY.md).
    """

    model: str
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    memory: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidReference(f"model must be an adapter reference or the base's name, got {self.model!r}")
        if (self.prompt is None) == (self.messages is None):
            raise InvalidConfig("a request has exactly one of prompt and messages")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidConfig(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.messages is not None:
            if isinstance(self.messages, (str, bytes)) or not isinstance(self.messages, Sequence) or not self.messages:
                raise InvalidConfig("messages must be a non-empty sequence of {'role': ..., 'content': ...} dicts")
            checked = []
            for i, m in enumerate(self.messages):
                if not isinstance(m, Mapping) or not {"role", "content"} <= set(m) <= {"role", "content", "name"}:
                    raise InvalidConfig(f"message {i} must have the keys 'role' and 'content' (and optionally 'name')")
                if m["role"] not in ROLES or not isinstance(m["content"], str):
                    raise InvalidConfig(f"message {i}: role must be one of {', '.join(ROLES)} and content a string")
                message = {"role": "system" if m["role"] == SYSTEM_ALIAS else m["role"], "content": m["content"]}
                if "name" in m:
                    if not isinstance(m["name"], str) or not m["name"]:
                        raise InvalidConfig(f"message {i}: name must be a non-empty string")
                    message["name"] = m["name"]
                checked.append(message)
            object.__setattr__(self, "messages", tuple(checked))
        if self.memory is not None and not isinstance(self.memory, bool):
            raise InvalidConfig(f"memory must be True, False or None, got {self.memory!r}")
        if not isinstance(self.params, SamplingParams):
            raise InvalidConfig(f"params must be SamplingParams, got {type(self.params).__name__}")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced.

    ``finish_reason`` is ``stop`` (end-of-sequence token or a stop string; the stop string is not in
    ``text``) or ``length`` (``max_new_tokens`` or the context length). ``model`` is the request's
    model as sent. ``resolved`` lists the pinned parts that ran, with their weights
    (``("user:alice@v3", "domain:finance@v1*0.5")``; empty for the base); ``domain:auto`` appears as
    the domains the router chose, a layered adapter as itself followed by its pinned layer. Joined
    with ``+`` it is a model that computes the same row.
    ``logprobs`` (when the request's ``params.logprobs`` is set) has one entry per generated token,
    the end-of-sequence token excepted. ``memories`` are the ids of the memory entries put in the
    prompt (``persona memory show``), best first; empty when memory was off or found nothing.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model: str
    resolved: tuple[str, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    memories: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started, and what is resident now."""

    resident: tuple[str, ...]  # pinned refs in slots, least recently used first
    cpu_cached: tuple[str, ...]  # pinned refs in the CPU tier
    max_resident: int
    loads: int  # adapter versions read from the store (hash-checked)
    cpu_hits: int  # loads served by the CPU tier instead
    resident_hits: int  # uses of an adapter already in a slot
    evictions: int  # slots given to another adapter
    requests: int  # requests finished (generate, submit, stream)
    failed: int  # requests that ended in an error
    cancelled: int  # submitted requests stopped by Handle.cancel() (e.g. their HTTP client went away)
    prompt_tokens: int
    tokens_generated: int
    batches: int  # static batches run (generate chunks, static worker) and continuous prefills (rows joining)
    largest_batch: int  # most rows in one decode step
    slot_bytes: int  # memory of the slot tensors
    cpu_cache_bytes: int  # memory of the CPU tier
    times: "ServingTimes" = None  # type: ignore[assignment] - where the worker's time went (always set by Engine)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["resident"], d["cpu_cached"] = list(self.resident), list(self.cpu_cached)
        d["times"] = None if self.times is None else dict(self.times.__dict__)
        return d


@dataclass
class JobTimes:
    """When a submitted job passed each point on its way to its first token (``time.perf_counter``; 0: not yet).

    Filled by the engine and its worker; :class:`ServingTimes` sums the gaps over requests.
    """

    submitted: float = 0.0  # Engine.submit queued it
    taken: float = 0.0  # the worker took it from its queue (the step in flight, if any, had ended)
    admitted: float = 0.0  # admission let it join a step
    prefill_start: float = 0.0  # its prefill forward began (model lock held, adapters resident)
    prefill_end: float = 0.0  # that forward returned
    first_token: float = 0.0  # its first token was chosen and its text handed to its stream


@dataclass(frozen=True)
class ServingTimes:
    """Where the continuous worker's time went, summed since the engine started (seconds; relative
    shares are what they are for: wall time on a shared machine says little). Divide a ``*_s`` of a
    request phase by ``first_tokens`` for its mean.

    Time to first token of a submitted request = ``queue_s`` (waiting for the step in flight, or the
    idle worker's gathering wait) + ``admission_s`` (held back by the admission policy) + ``setup_s``
    (model lock, adapter loads) + ``prefill_s`` (its prompt's forward) + ``first_token_s`` (choosing
    the token, detokenizing, handing it to the stream). Per step: ``decode_s`` over ``decode_steps``
    decode iterations (``decode_rows`` rows in all), ``prefill_steps`` prefill iterations (a long
    prompt's chunks included), ``join_s`` re-packing the KV cache when rows joined, ``routes_s``
    gathering the running rows' LoRA factors (these two also count ``generate()``'s batches).
    """

    first_tokens: int = 0
    queue_s: float = 0.0
    admission_s: float = 0.0
    setup_s: float = 0.0
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_s: float = 0.0
    join_s: float = 0.0
    routes_s: float = 0.0

    def of(self, times: "JobTimes") -> "ServingTimes":
        """These totals with one more request's first token (``times`` fully set)."""
        return replace(
            self, first_tokens=self.first_tokens + 1,
            queue_s=self.queue_s + max(0.0, times.taken - times.submitted),
            admission_s=self.admission_s + max(0.0, times.admitted - times.taken),
            setup_s=self.setup_s + max(0.0, times.prefill_start - times.admitted),
            prefill_s=self.prefill_s + (times.prefill_end - times.prefill_start),
            first_token_s=self.first_token_s + (times.first_token - times.prefill_end),
        )

    def plus(self, **increments: float) -> "ServingTimes":
        return replace(self, **{k: getattr(self, k) + v for k, v in increments.items()})


@dataclass(frozen=True)
class Delta:
    """A piece of streamed text with the logprobs of the tokens that produced it (empty unless asked for).

    Text is held back while it could still turn into a stop string, so one delta may carry several
    tokens' entries, and the last one may carry entries with no text.
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class Handle:
    """A submitted request.

    >>> handle = engine.submit(GenerationRequest("user:alice", prompt="Hi"))   # doctest: +SKIP
    >>> for delta in handle.stream(): print(delta, end="")                    # doctest: +SKIP
    >>> handle.result().finish_reason                                         # doctest: +SKIP
    'stop'

    ``result()`` and ``stream()`` may both be used; ``stream()`` has one consumer. Leaving a
    ``stream()`` loop early cancels the request (its row stops at the next token).
    """

    def __init__(self, request: GenerationRequest, resolved: tuple[str, ...], *, streaming: bool = True,
                 memories: tuple[str, ...] = ()):
        self.request = request
        self.resolved = resolved
        self.memories = memories  # the memory ids in the prompt: known at admission, before any token
        self._streaming = streaming  # False: only the result is wanted, deltas are dropped
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[["Handle"], None]] = []
        self._callbacks_lock = threading.Lock()

    # ------------------------------------------------------------------ the caller's side
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Ask the worker to stop this request; False if it has already finished."""
        if self._done.is_set():
            return False
        self._cancel.set()
        return True

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def error(self) -> BaseException | None:
        """The request's error once it is done (``CancelledError`` for a cancelled one), else None."""
        return self._error

    def add_done_callback(self, callback: Callable[["Handle"], None]) -> None:
        """Call ``callback(handle)`` once, when the request finishes or fails (at once if it already has).

        It runs in the thread that ends the request (usually the engine's worker): keep it short and
        thread-safe, e.g. ``loop.call_soon_threadsafe(...)``, so an async caller can await a request
        without holding a thread for it.
        """
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the whole result; re-raise the request's error; ``TimeoutError`` after ``timeout`` s."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no result for {self.request.model!r} after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def stream(self, timeout: float | None = None, *, with_logprobs: bool = False) -> Iterator[Any]:
        """Yield text deltas as tokens are produced; raise the request's error at the end, if any.

        ``timeout`` bounds the wait for each next delta (``TimeoutError``). ``with_logprobs=True``
        yields :class:`Delta` objects instead of strings (with the tokens' logprobs, when the request
        records them).
        """
        finished = False
        try:
            while True:
                try:
                    item = self._events.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no text for {self.request.model!r} for {timeout}s") from None
                if item is _END:
                    finished = True
                    break
                if with_logprobs != isinstance(item, Delta):
                    item = Delta(item) if with_logprobs else item.text
                if item:
                    yield item
        finally:
            if not finished:
                self.cancel()
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ the worker's side
    def emit(self, text: str, logprobs: tuple[TokenLogprob, ...] | None = None) -> None:
        if self._streaming:
            self._events.put(text if logprobs is None else Delta(text, logprobs))

    def finish(self, result: GenerationResult) -> None:
        if self._done.is_set():
            return
        if self.memories and not result.memories:
            result = replace(result, memories=self.memories)
        self._result = result
        self._done.set()
        self._events.put(_END)
        self._run_callbacks()

    def fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._done.set()
        self._events.put(_END)
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        with self._callbacks_lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a watcher's bug must not break the worker
                logging.getLogger(__name__).exception("a done-callback of a request failed")


@dataclass
class Job:
    """An admitted request: pinned parts, prompt tokens, the effective token budget, and its sink."""

    request: GenerationRequest
    parts: tuple[StackPart, ...]
    prompt_ids: list[int]
    max_new_tokens: int
    handle: Handle
    grammar: RowGrammar | None = None  # the row's response_format state, built at admission
    times: JobTimes = field(default_factory=JobTimes)  # instrumentation: its way to its first token

    @property
    def refs(self) -> tuple[AdapterRef, ...]:
        return tuple(p.ref for p in self.parts)


def when_all_done(handles: Sequence[Handle], callback: Callable[[], None]) -> None:
    """Call ``callback()`` once, when every one of ``handles`` (a request's ``n`` choices) has
    finished or failed; in the thread that ends the last one (see :meth:`Handle.add_done_callback`)."""
    left, lock = [len(handles)], threading.Lock()

    def one_done(_handle) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            callback()

    for handle in handles:
        handle.add_done_callback(one_done)


def cancelled_error() -> BaseException:
    """The error a request cancelled by :meth:`Handle.cancel` ends with."""
    from concurrent.futures import CancelledError

    return CancelledError("the request was cancelled")
