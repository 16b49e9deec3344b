"""The batch worker: requests from many threads, run together in mixed batches by one thread.

``Engine.submit`` (in the caller's thread) validates and admits a request into a ``Job``, then
queues it here. One worker thread takes the first waiting job, waits a few milliseconds for more (up
to ``max_batch``), and hands them to the engine's run function as one batch. An exception while
running a batch is delivered to the handles of that batch; the worker itself keeps serving.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import CancelledError
from typing import Callable, Sequence

from ..errors import EngineClosed
from .requests import Job

__all__ = ["BatchWorker", "EngineClosed"]

_STOP = object()


class BatchWorker:
    """One background thread that runs queued jobs in batches of up to ``max_batch``.

    ``run`` receives a list of admitted jobs; it must finish or fail every handle
    (whatever it leaves open is failed with the exception it raised, or an error saying so).
    """

    def __init__(
        self, run: Callable[[Sequence[Job]], None], *, max_batch: int, wait_s: float, name: str = "persona-engine"
    ):
        self._run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, job: Job) -> None:
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

    def _next_batch(self) -> tuple[list[Job], bool]:
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
