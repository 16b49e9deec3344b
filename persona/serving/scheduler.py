"""The engine's worker thread and its admission policy: requests from many threads, run together.

``Engine.submit`` (in the caller's thread) validates and admits a request into a ``Job``, then
queues it here. ``ContinuousWorker`` (Orca's iteration-level scheduling, as vLLM, TGI and SGLang
do): at every iteration it admits waiting jobs, in arrival order, under ``AdmissionPolicy`` (rows,
tokens of the step, resident adapters), and hands them to the engine's step function, which
prefills them first (their first tokens are streamed at once), or else runs the next chunk of a
long prompt or decodes every running row one token, and lets finished rows leave. A request that
arrives mid-batch joins at the next iteration instead of waiting for the batch to end. (A static
scheduler, which ran each gathered batch to its end, was kept for comparison until continuous
batching had been measured against it; it was removed after that, see docs/BENCHMARKS.md.)

An exception while running is delivered to the handles it concerns; the worker keeps serving.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import EngineClosed
from .requests import Job

__all__ = ["AdmissionPolicy", "ContinuousWorker", "EngineClosed", "Occupancy"]

_STOP = object()


class _Worker:
    """A queue and the one thread that serves it; ``put`` starts the thread, ``close`` stops it."""

    def __init__(self, *, max_batch: int, wait_s: float, name: str):
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

    def _loop(self) -> None:
        raise NotImplementedError

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


@dataclass(frozen=True)
class Occupancy:
    """What the running batch holds after a step: its rows, the adapter versions they read, and
    whether a long prompt is part way through its chunked prefill (it runs on at the next steps)."""

    rows: int = 0
    adapters: frozenset[str] = frozenset()
    prefilling: bool = False

    @property
    def busy(self) -> bool:
        """Whether the engine has work of its own for the next step (rows to decode, a prompt to go on with)."""
        return self.rows > 0 or self.prefilling


@dataclass(frozen=True)
class AdmissionPolicy:
    """Which waiting jobs join the running batch at a step: strictly first come, first served.

    A job joins while the batch stays within ``max_batch`` rows, the joining prompts' tokens within
    ``max_batch_tokens``, and the distinct adapters of the running and joining rows within
    ``max_resident`` (an adapter a running row reads stays resident). The running rows' tokens do
    not count: the engine prefills joining rows in an iteration of their own (prefill first), so the
    budget bounds the tokens of one forward. A prompt longer than ``max_batch_tokens`` joins as the
    only prompt of its step, and the engine prefills it in chunks of ``max_batch_tokens``; nothing
    joins until its last chunk has run. Admission stops at the first job that does not fit and
    nothing overtakes it, so no stream of short requests can starve a long prompt: it waits at most
    for rows (``max_batch``) or adapter slots to free.
    """

    max_batch: int
    max_batch_tokens: int
    max_resident: int

    def admit(self, waiting: deque[Job], occupancy: Occupancy) -> list[Job]:
        """Pop the jobs that join now from the left of ``waiting``, in order."""
        joining: list[Job] = []
        if occupancy.prefilling:
            return joining
        tokens = 0
        adapters = set(occupancy.adapters)
        while waiting and occupancy.rows + len(joining) < self.max_batch:
            job = waiting[0]
            need = {str(r) for r in job.refs}
            if len(adapters | need) > self.max_resident:
                break
            prompt = len(job.prompt_ids)
            if joining and tokens + prompt > self.max_batch_tokens:  # alone, a longer prompt is chunked
                break
            joining.append(waiting.popleft())
            tokens += prompt
            adapters |= need
        return joining


class ContinuousWorker(_Worker):
    """One background thread that schedules per iteration: jobs join and leave the running batch at every step.

    ``step(joining)`` runs one iteration in the engine (prefill ``joining``, or the next chunk of a
    long prompt, or decode the running rows one token; drop finished rows) and returns the batch's
    ``Occupancy``; it must finish or fail
    every handle it drops, and on an exception fail every job it holds (the batch is then empty).
    """

    def __init__(
        self,
        step: Callable[[Sequence[Job]], Occupancy],
        policy: AdmissionPolicy,
        *,
        wait_s: float,
        name: str = "persona-engine",
    ):
        super().__init__(max_batch=policy.max_batch, wait_s=wait_s, name=name)
        self._step = step
        self.policy = policy

    def _loop(self) -> None:
        waiting: deque[Job] = deque()
        occupancy, stopping = Occupancy(), False
        while True:
            if not waiting and not occupancy.busy:
                if stopping:
                    break
                # Idle: block for the next job, then wait a moment for others arriving with it.
                batch, stopping = self._next_batch()
                now = time.perf_counter()
                for job in batch:
                    job.times.taken = now
                waiting.extend(batch)
            stopping = self._take_arrivals(waiting) or stopping
            if stopping:  # closing: what has not joined yet fails; running rows finish
                while waiting:
                    waiting.popleft().handle.fail(EngineClosed("the engine was closed before this request ran"))
            self._drop_cancelled(waiting)
            joining = self.policy.admit(waiting, occupancy)
            now = time.perf_counter()
            for job in joining:
                job.times.admitted = now
            if not joining and not occupancy.busy:
                continue
            try:
                occupancy = self._step(joining)
            except BaseException:  # noqa: BLE001 - the step failed its own jobs; the worker lives on
                occupancy = Occupancy()
            for job in joining:
                if not job.handle.done() and not occupancy.busy:
                    job.handle.fail(RuntimeError("internal error: the engine left this request unfinished"))
        self._fail_queued()

    def _take_arrivals(self, waiting: deque[Job]) -> bool:
        """Move every queued job to ``waiting`` without blocking; True if a stop was queued."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is _STOP:
                return True
            job.times.taken = time.perf_counter()
            waiting.append(job)

    @staticmethod
    def _drop_cancelled(waiting: deque[Job]) -> None:
        if any(job.handle.cancelled for job in waiting):
            for job in [j for j in waiting if j.handle.cancelled]:
                waiting.remove(job)
                job.handle.fail(CancelledError())
