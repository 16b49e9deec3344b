"""The thread-safe front of the engine: requests from many threads, run together in mixed batches.

``submit`` (in the caller's thread) validates and admits a request, then queues it. One worker
thread takes the first waiting request, waits a few milliseconds for more (up to ``max_batch``),
and runs them as one batch. Every request has a ``Handle``: its result when it is done, or its text
as it is produced. An exception while running a batch is delivered to the handles of that batch;
the worker itself keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..errors import EngineClosed

if TYPE_CHECKING:
    from .engine import GenerationRequest, GenerationResult
    from .sampling import TokenLogprob

_END = object()
_STOP = object()


@dataclass(frozen=True)
class Delta:
    """A piece of streamed text with the logprobs of the tokens that produced it (empty unless asked for).

    Text is held back while it could still turn into a stop string, so one delta may carry several
    tokens' entries, and the last one may carry entries with no text.
    """

    text: str
    logprobs: "tuple[TokenLogprob, ...]" = ()


class Handle:
    """A submitted request.

    >>> handle = engine.submit(GenerationRequest("user:alice", prompt="Hi"))   # doctest: +SKIP
    >>> for delta in handle.stream(): print(delta, end="")                    # doctest: +SKIP
    >>> handle.result().finish_reason                                         # doctest: +SKIP
    'stop'

    ``result()`` and ``stream()`` may both be used; ``stream()`` has one consumer. Leaving a
    ``stream()`` loop early cancels the request (its row stops at the next token).
    """

    def __init__(self, request: "GenerationRequest", resolved: tuple[str, ...], *, streaming: bool = True):
        self.request = request
        self.resolved = resolved
        self._streaming = streaming  # False: only the result is wanted, deltas are dropped
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._result: "GenerationResult | None" = None
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

    def result(self, timeout: float | None = None) -> "GenerationResult":
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
    def emit(self, text: str, logprobs: "tuple[TokenLogprob, ...] | None" = None) -> None:
        if self._streaming:
            self._events.put(text if logprobs is None else Delta(text, logprobs))

    def finish(self, result: "GenerationResult") -> None:
        if self._done.is_set():
            return
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


class BatchWorker:
    """One background thread that runs queued jobs in batches of up to ``max_batch``.

    ``run`` receives a list of jobs, each with a ``handle``; it must finish or fail every handle
    (whatever it leaves open is failed with the exception it raised, or an error saying so).
    """

    def __init__(
        self, run: Callable[[Sequence[Any]], None], *, max_batch: int, wait_s: float, name: str = "persona-engine"
    ):
        self._run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, job: Any) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed; create a new Engine to serve more requests")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put(job)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, fail the queued ones, let the running batch finish, join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._fail_queued()
        self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout)

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job.handle.fail(EngineClosed("the engine was closed before this request ran"))

    def _next_batch(self) -> tuple[list[Any], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            live = []
            for job in batch:
                if job.handle.cancelled:
                    job.handle.fail(CancelledError())
                else:
                    live.append(job)
            if not live:
                continue
            try:
                self._run(live)
            except BaseException as exc:  # noqa: BLE001 - delivered to the batch's handles; the worker lives on
                for job in live:
                    job.handle.fail(exc)
            else:
                for job in live:
                    job.handle.fail(RuntimeError("internal error: the engine left this request unfinished"))
        self._fail_queued()


def when_all_done(handles: Sequence["Handle"], callback: Callable[[], None]) -> None:
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
