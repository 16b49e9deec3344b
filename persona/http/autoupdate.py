"""The server's learning loop: ``persona serve --log-interactions --auto-update POLICY``.

A scheduler thread checks the policy (:mod:`persona.http.update_policy`) every few seconds against
the store's pending counts (``Store.pending_counts``: one read per pending file, no ``meta.json``),
and when a run is due starts **one** worker: a child process running
``python -m persona update --all --json --origin auto-update`` over the server's store, device and
dtype. The server then picks up each promoted version the way it picks up any moved ``current``: the
engine pins ``current`` from ``refs.json`` at every request's admission.

Why a child process running the CLI, not a thread or a ``multiprocessing`` worker calling the
library: training must never hold the server's GIL, its memory or its CUDA context, and a crash of
training (an out-of-memory kill, a segfault in a kernel, a bug) must end only the worker. A separate
interpreter started from the same CLI a person would run shares nothing with the server but the
store, whose writes are atomic and locked; it is exactly ``persona update --all`` (bulk training of
many adapters included), so there is one update path to test, and its ``--json`` output and exit
code are the whole interface. ``multiprocessing`` 'spawn' would give the isolation too, but would
tie the worker to the server's Python objects and pickling for no gain.

One adapter's failure is not the run's: ``persona update --all`` reports each adapter, and exits 1
when any failed while the others published. Such a run worked; the failed adapter is quarantined
(:mod:`persona.http.quarantine`): later runs ``--exclude`` it and its rows do not count toward the
policy, until its pending queue changes or a new version of it is published. A run fails as a whole
only when it gives no per-adapter report: it crashed, was killed, hit a store-wide error (a full
disk) or wrote output that is not the JSON list.

Safety: at most one worker at a time (the scheduler waits for it); after a run that failed as a
whole the next waits a back-off (60 s, doubling to an hour); the worker runs in its own session (a
Ctrl-C at the terminal reaches only the server, which then stops it) at a lower CPU priority (nice 10). Its stderr goes to the
server's log, cut to its last ``log_chars`` characters. On shutdown the worker gets SIGTERM
(``persona update`` stops training and publishes nothing), then SIGKILL after ``stop_grace_s``. Either
way each adapter is left published or untouched: a version is published by one rename, and the pending
rows it trained on leave the queue only after that (a kill in between is caught by the next update,
see :mod:`persona.store.queues`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..errors import PersonaError
from ..store.records import AUTO_UPDATE_ORIGIN
from ..training.config import HOLDOUT_MIN_ROWS
from .quarantine import Quarantine, Quarantined
from .update_policy import UpdatePolicy

if TYPE_CHECKING:
    from ..store.queues import PendingFingerprint

log = logging.getLogger("persona.autoupdate")


@dataclass(frozen=True)
class AutoUpdateSettings:
    """How the loop runs: its policy, the worker's command line, and its timings."""

    policy: UpdatePolicy
    store_root: str
    device: str = "auto"
    dtype: str = "auto"
    update_args: tuple[str, ...] = ()  # more `persona update` options (--epochs 1, --max-steps 50, ...)
    # An adapter with fewer pending rows waits (its rows do not trigger a run, the run leaves it out): an
    # update of fewer than HOLDOUT_MIN_ROWS holds none out, so its version could only become a candidate.
    min_pending: int = HOLDOUT_MIN_ROWS
    check_interval_s: float = 10.0  # how often the policy is checked
    backoff_s: float = 60.0  # wait after a run failed as a whole before the next; doubles per failure in a row
    max_backoff_s: float = 3600.0
    stop_grace_s: float = 10.0  # on shutdown: SIGTERM, this long, then SIGKILL
    log_chars: int = 4000  # the worker's stderr in the server's log, cut to its end

    def command(self, exclude: Sequence[str] = ()) -> list[str]:
        """The worker's argv: ``persona update --all`` over the server's store, device and dtype, leaving
        out the ``exclude``d (quarantined) adapters."""
        left_out = [arg for adapter in exclude for arg in ("--exclude", adapter)]
        return [sys.executable, "-m", "persona", "update", "--all", "--json", "--origin", AUTO_UPDATE_ORIGIN,
                "--store", self.store_root, "--device", self.device, "--dtype", self.dtype,
                "--min-pending", str(self.min_pending), *left_out, *self.update_args]


@dataclass(frozen=True)
class AutoUpdateStats:
    """What ``/metrics`` shows of the loop (a snapshot)."""

    pending_rows: int = 0  # at the last check, over every adapter
    adapters_pending: int = 0  # adapters with at least one pending row
    runs: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    updates: dict[str, int] = field(default_factory=lambda: {"promoted": 0, "rejected": 0, "failed": 0})
    running: bool = False
    last_run_end: float | None = None  # unix time
    last_run_seconds: float | None = None
    failures_in_a_row: int = 0  # runs failed as a whole
    quarantined: int = 0  # adapters left out of runs since their update failed


@dataclass(frozen=True)
class FailedUpdate:
    """One adapter's failed update in a run, and why (``Type: message``, one line)."""

    adapter: str
    reason: str

    def __str__(self) -> str:
        return f"{self.adapter} ({self.reason})" if self.reason else self.adapter


@dataclass(frozen=True)
class RunOutcome:
    """One worker run, read from its exit code and ``--json`` output."""

    exit_code: int
    seconds: float
    promoted: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    failed: tuple[FailedUpdate, ...] = ()
    error: str | None = None  # why the run failed as a whole, one line

    @property
    def ok(self) -> bool:
        """Whether the run worked as a whole (some of its adapters may still have failed: ``failed``)."""
        return self.error is None


def read_outcome(exit_code: int, seconds: float, stdout: str, stderr: str, log_chars: int = 4000) -> RunOutcome:
    """The outcome of ``persona update --all --json``: each entry with ``promoted`` true or false is an
    update promoted or kept as candidate; an entry without it is that adapter's failed update. The run
    fails as a whole when its output is not that list, or its exit code is neither 0 nor the 1 that
    ``update --all`` gives when some adapters failed (and the list names them)."""
    results: Any = None
    try:
        results = json.loads(stdout) if stdout.strip() else ([] if exit_code == 0 else None)
    except ValueError:
        pass
    promoted: list[str] = []
    rejected: list[str] = []
    failed: list[FailedUpdate] = []
    if isinstance(results, list):
        for entry in results:
            if not isinstance(entry, dict):
                continue
            name = str(entry.get("adapter", "?"))
            if entry.get("promoted") is True:
                promoted.append(f"{name}@{entry.get('label', entry.get('version'))}")
            elif entry.get("promoted") is False:
                rejected.append(f"{name}@{entry.get('label', entry.get('version'))}")
            else:  # one adapter's failure in a bulk run that went on: its name and, when given, why
                failed.append(FailedUpdate(name, _why(entry.get("error") or entry.get("reason"))[:log_chars]))
    error = None
    if not isinstance(results, list):
        error = _error_line(stderr, log_chars) or (f"exit status {exit_code}" if exit_code else
                                                   "output is not a JSON list")
    elif exit_code != 0 and not (exit_code == 1 and failed):
        error = _error_line(stderr, log_chars) or f"exit status {exit_code}"
    return RunOutcome(exit_code, seconds, tuple(promoted), tuple(rejected), tuple(failed), error)


def _why(error: Any) -> str:
    """An entry's ``{"type", "message"}`` error (or a plain string) as ``Type: message``."""
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
        return f"{kind}: {message}" if kind and message else str(message or kind or "")
    return str(error) if error else ""


def _error_line(stderr: str, log_chars: int) -> str:
    """The CLI's ``{"error": {...}}`` line as ``Type: message``, else the end of stderr."""
    for line in reversed(stderr.strip().splitlines()):
        try:
            err = json.loads(line)["error"]
            return f"{err['type']}: {err['message']}"[:log_chars]
        except (ValueError, KeyError, TypeError):
            continue
    return _tail(stderr, log_chars)


def _tail(text: str, chars: int) -> str:
    text = text.strip()
    return ("..." + text[-chars:]) if len(text) > chars else text


class AutoUpdater:
    """The scheduler thread and its one worker process. ``start()`` with the server, ``stop()`` at shutdown.

    >>> updater = AutoUpdater(store, AutoUpdateSettings(parse_policy("pending>=32"), str(store.root)))  # doctest: +SKIP
    >>> updater.start(); ...; updater.stop()                                                           # doctest: +SKIP
    """

    def __init__(self, store, settings: AutoUpdateSettings, *, clock: Callable[[], float] = time.time,
                 local_now: Callable[[], datetime] = datetime.now):
        self.store, self.settings = store, settings
        self._clock, self._local_now = clock, local_now
        self._stats = AutoUpdateStats()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: subprocess.Popen | None = None
        self._since = clock()  # `every=` counts from the server's start, then from each run's end
        self._not_before = 0.0  # back-off after a run failed as a whole
        self._quarantine = Quarantine()  # the scheduler thread's own: no lock

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the scheduler thread (a daemon: it never keeps the process alive)."""
        _log_to_stderr()
        if self._thread is None:
            log.info("on (%s); checks every %gs; worker: %s", self.settings.policy, self.settings.check_interval_s,
                     " ".join(self.settings.command()[1:]))
            self._thread = threading.Thread(target=self._loop, name="persona-auto-update", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop checking; a running worker gets SIGTERM, then SIGKILL after ``stop_grace_s``; wait for both."""
        self._stopping.set()
        with self._lock:
            worker = self._worker
        if worker is not None and worker.poll() is None:
            log.warning("stopping the worker (pid %d): adapters it has not published yet stay as they were", worker.pid)
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(self.settings.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the worker (pid %d) did not stop in %gs; killing it", worker.pid,
                            self.settings.stop_grace_s)
                worker.kill()
                worker.wait()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.stop_grace_s + 5)

    def stats(self) -> AutoUpdateStats:
        """A snapshot for ``/metrics`` (no store read: the pending counts are the last check's)."""
        with self._lock:
            return self._stats

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stopping.wait(self.settings.check_interval_s):
            try:
                self.check()
            except Exception:
                log.exception("check failed; trying again in %gs", self.settings.check_interval_s)

    def check(self) -> RunOutcome | None:
        """Read the pending counts and, when the policy says so, run one worker to its end (its outcome).

        Quarantined adapters whose pending queue or newest version changed are let back in first; the
        others' rows, and those of adapters with fewer than ``min_pending`` rows, do not count toward the
        policy."""
        pending = self.store.pending_counts()
        for released in self._quarantine.release_changed(self.store, pending):
            log.info("%s is tried again at the next run: %s", released.adapter, released.why)
        eligible = {adapter: rows for adapter, rows in pending.items()
                    if adapter not in self._quarantine and rows >= self.settings.min_pending}
        self._update(pending_rows=sum(pending.values()), adapters_pending=len(pending),
                     quarantined=len(self._quarantine))
        now = self._clock()
        policy = self.settings.policy
        if now < self._not_before or (policy.quiet is not None and self._local_now().time() in policy.quiet):
            return None
        reason = policy.due(eligible, now - self._since)
        if reason is None or self._stopping.is_set():
            return None
        return self._run(reason, eligible)

    def _run(self, reason: str, eligible: Collection[str]) -> RunOutcome | None:
        started = self._clock()
        # What each adapter's queue held as the run began: a failed one is quarantined with it.
        fingerprints = {adapter: self._fingerprint(adapter) for adapter in eligible}
        command = self.settings.command(exclude=self._quarantine.adapters())
        with self._lock:  # stop() sees the worker from the moment it exists
            if self._stopping.is_set():
                return None
            try:
                worker = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
            except OSError as exc:  # no memory or processes left to fork: a failed run, backed off like any
                worker, cannot = None, exc
            else:
                self._worker = worker
                self._stats = replace(self._stats, running=True)
        if worker is None:
            failed = RunOutcome(-1, 0.0, error=f"cannot start the worker: {cannot}")
            self._record(failed)
            return failed
        _lower_priority(worker.pid)
        log.info("worker pid %d started: %s", worker.pid, reason)
        stdout, stderr = worker.communicate()
        seconds = self._clock() - started
        outcome = read_outcome(worker.returncode, seconds, stdout, stderr, self.settings.log_chars)
        with self._lock:
            self._worker = None
            stopped = self._stopping.is_set()
            self._stats = replace(self._stats, running=False)
        if stopped:
            log.info("worker pid %d stopped with the server (exit %s)", worker.pid, worker.returncode)
            return outcome
        if outcome.ok and stderr.strip():  # warnings of a run that worked: the log keeps them too
            log.info("worker pid %d wrote to stderr: %s", worker.pid, _tail(stderr, self.settings.log_chars))
        self._record(outcome)
        if outcome.ok:
            self._quarantine_failed(outcome.failed, fingerprints)
        return outcome

    def _fingerprint(self, adapter: str) -> PendingFingerprint | None:
        try:
            return self.store.pending_fingerprint(adapter)
        except (PersonaError, OSError):  # deleted or unreadable now: unknown, so released at the next check
            return None

    def _quarantine_failed(self, failed: Sequence[FailedUpdate], fingerprints: dict) -> None:
        """Leave each adapter that failed out of the next runs, until its queue or newest version changes."""
        for failure in failed:
            try:
                versions = self.store.version_numbers(failure.adapter)
            except (PersonaError, OSError):  # deleted meanwhile, or not a name of this store: nothing to hold
                versions = None
            if versions is None:
                continue
            self._quarantine.hold(Quarantined(failure.adapter, failure.reason, fingerprints.get(failure.adapter),
                                              versions[-1] if versions else None))
            log.warning("quarantined %s: its update failed (%s); it is left out of the runs until a chat is logged "
                        "to it, its pending queue changes or a new version of it is published", failure.adapter,
                        failure.reason or "no reason given")
        self._update(quarantined=len(self._quarantine))

    def _record(self, outcome: RunOutcome) -> None:
        end = self._clock()
        self._since = end
        with self._lock:
            s = self._stats
            failures = 0 if outcome.ok else s.failures_in_a_row + 1
            runs = {**s.runs, "ok" if outcome.ok else "failed": s.runs["ok" if outcome.ok else "failed"] + 1}
            updates = {"promoted": s.updates["promoted"] + len(outcome.promoted),
                       "rejected": s.updates["rejected"] + len(outcome.rejected),
                       "failed": s.updates["failed"] + len(outcome.failed)}
            self._stats = replace(s, runs=runs, updates=updates, last_run_end=end, last_run_seconds=outcome.seconds,
                                  failures_in_a_row=failures)
        if outcome.ok:
            self._not_before = 0.0
            log.info("run done in %.1fs: promoted %s; kept as candidate %s%s", outcome.seconds,
                     ", ".join(outcome.promoted) or "none", ", ".join(outcome.rejected) or "none",
                     f"; failed {', '.join(f.adapter for f in outcome.failed)}" if outcome.failed else "")
            return
        wait = min(self.settings.backoff_s * 2 ** (failures - 1), self.settings.max_backoff_s)
        self._not_before = end + wait
        log.warning("run failed (exit %s) after %.1fs, next try in %gs at the earliest: %s", outcome.exit_code,
                    outcome.seconds, wait, outcome.error)

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._stats = replace(self._stats, **changes)


def _lower_priority(pid: int) -> None:
    """Training yields the CPU to serving (nice 10); where that is not allowed, it runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 10)
    except (AttributeError, OSError):
        pass


def _log_to_stderr() -> None:
    """The loop's lines on the server's stderr beside uvicorn's (``INFO:     auto-update: ...``)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_UvicornStyle())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class _UvicornStyle(logging.Formatter):
    """``INFO:     auto-update: ...``, ``WARNING:  auto-update: ...``: aligned as uvicorn aligns its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname + ':':<9} auto-update: {super().format(record)}"


class AutoUpdateCollector:
    """The loop's Prometheus metrics, read from :meth:`AutoUpdater.stats` at scrape time."""

    def __init__(self, updater: AutoUpdater):
        self.updater = updater

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.updater.stats()
        yield GaugeMetricFamily("persona_pending_rows", "Interactions waiting in pending queues, all adapters "
                                "(at the auto-update loop's last check)", value=s.pending_rows)
        yield GaugeMetricFamily("persona_adapters_pending", "Adapters with at least one pending row",
                                value=s.adapters_pending)
        updates = CounterMetricFamily("persona_auto_updates", "Adapter updates by the auto-update loop, by result",
                                      labels=["result"])
        for result, count in s.updates.items():
            updates.add_metric([result], count)
        yield updates
        runs = CounterMetricFamily("persona_auto_update_runs", "Worker runs of the auto-update loop, by result",
                                   labels=["result"])
        for result, count in s.runs.items():
            runs.add_metric([result], count)
        yield runs
        yield GaugeMetricFamily("persona_auto_update_running", "1 while an auto-update worker runs",
                                value=int(s.running))
        if s.last_run_end is not None:
            yield GaugeMetricFamily("persona_auto_update_last_run_timestamp_seconds",
                                    "When the last run ended (unix time)", value=s.last_run_end)
            yield GaugeMetricFamily("persona_auto_update_last_run_duration_seconds", "How long the last run took",
                                    value=s.last_run_seconds)
        yield GaugeMetricFamily("persona_auto_update_quarantined_adapters", "Adapters left out of auto-update runs "
                                "since their update failed, until their pending queue or newest version changes",
                                value=s.quarantined)
