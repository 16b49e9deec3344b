"""When the server's learning loop starts a bulk update: ``persona serve --auto-update POLICY``.

The grammar (comma-separated clauses, each at most once, at least one trigger)::

    pending>=N          an adapter's pending queue holds N rows or more (N >= 1)
    every=DURATION      DURATION since the last run (or the server's start) and some row is pending;
                        DURATION is a whole number with s, m, h or d: 90s, 30m, 1h, 1d
    quiet=HH:MM-HH:MM   local time in which no run starts (it may wrap midnight: 22:00-06:00);
                        a run already going when quiet hours begin finishes

Either trigger starts a run (``pending>=32,every=1h``). A run updates every adapter with pending
rows (``persona update --all``), not only the one that reached N: the policy decides when, the bulk
update decides who. The loop hands :meth:`UpdatePolicy.due` the counts of the adapters it may run
(not those quarantined after a failed update, :mod:`persona.http.quarantine`). Torch-free and FastAPI-free: ``persona serve`` parses the option with it.

>>> parse_policy("pending>=32,every=1h,quiet=22:00-06:00").every_s
3600
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time as clock_time
from typing import Mapping

from ..errors import InvalidConfig

GRAMMAR = "pending>=N, every=DURATION (30m, 1h, 1d) and quiet=HH:MM-HH:MM, comma-separated, e.g. 'pending>=32,every=1h'"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CLAUSE = re.compile(r"\s*(?:(?P<pending>pending\s*>=\s*(?P<rows>\S*))|(?P<key>[a-z]+)\s*=\s*(?P<value>\S*))\s*")
_DURATION = re.compile(r"(\d{1,9})([smhd])")
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
MAX_EVERY_S = 366 * 86400


def _bad(message: str) -> InvalidConfig:
    return InvalidConfig(f"--auto-update: {message}; the policy is {GRAMMAR}")


@dataclass(frozen=True)
class QuietHours:
    """A daily window of local time, ``start`` inclusive, ``end`` exclusive; wraps midnight when start > end."""

    start: clock_time
    end: clock_time

    def __contains__(self, moment: clock_time) -> bool:
        moment = moment.replace(second=0, microsecond=0, tzinfo=None)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end  # 22:00-06:00

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class UpdatePolicy:
    """A parsed ``--auto-update`` policy: its triggers (either starts a run) and its quiet hours."""

    min_pending: int | None = None  # pending>=N
    every_s: int | None = None  # every=DURATION, in seconds
    quiet: QuietHours | None = None

    def due(self, pending: Mapping[str, int], seconds_since_last_run: float) -> str | None:
        """Why a run should start now, or None. ``pending`` is ``{adapter: rows}`` (``Store.pending_counts``)."""
        if not pending:
            return None
        if self.min_pending is not None:
            adapter, rows = max(pending.items(), key=lambda item: (item[1], item[0]))
            if rows >= self.min_pending:
                return f"{adapter} has {rows} pending rows (pending>={self.min_pending})"
        if self.every_s is not None and seconds_since_last_run >= self.every_s:
            return f"{sum(pending.values())} rows pending and {_duration(self.every_s)} since the last run (every)"
        return None

    def __str__(self) -> str:
        parts = [f"pending>={self.min_pending}"] if self.min_pending is not None else []
        parts += [f"every={_duration(self.every_s)}"] if self.every_s is not None else []
        parts += [f"quiet={self.quiet}"] if self.quiet is not None else []
        return ",".join(parts)


def _duration(seconds: int) -> str:
    for unit, size in sorted(_UNITS.items(), key=lambda u: -u[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"  # unreachable: every duration is whole seconds


def _clock(text: str) -> clock_time:
    match = _CLOCK.fullmatch(text)
    if not match:
        raise _bad(f"quiet hours need HH:MM-HH:MM in 24-hour local time, got {text!r}")
    return clock_time(int(match.group(1)), int(match.group(2)))


def parse_policy(text: str) -> UpdatePolicy:
    """Parse ``--auto-update``'s value; :class:`~persona.errors.InvalidConfig` names what is wrong.

    >>> parse_policy("pending>=2")
    UpdatePolicy(min_pending=2, every_s=None, quiet=None)
    """
    found: dict[str, object] = {}
    for clause in (text or "").split(","):
        match = _CLAUSE.fullmatch(clause)
        if not clause.strip() or not match:
            raise _bad(f"cannot read {clause.strip()!r}" if clause.strip() else "empty clause")
        key = "pending" if match.group("pending") else match.group("key")
        if key in found:
            raise _bad(f"{key} is given twice")
        if key == "pending":
            rows = match.group("rows")
            if not rows.isdigit() or not 1 <= int(rows) <= 10**9:
                raise _bad(f"pending>= needs a whole number of rows from 1, got {rows!r}")
            found[key] = int(rows)
        elif key == "every":
            value = match.group("value")
            duration = _DURATION.fullmatch(value)
            seconds = int(duration.group(1)) * _UNITS[duration.group(2)] if duration else 0
            if not duration or not 1 <= seconds <= MAX_EVERY_S:
                raise _bad(f"every= needs a duration such as 30m, 1h or 1d (1s to 366d), got {value!r}")
            found[key] = seconds
        elif key == "quiet":
            start, sep, end = match.group("value").partition("-")
            if not sep:
                raise _bad(f"quiet hours need HH:MM-HH:MM, got {match.group('value')!r}")
            window = QuietHours(_clock(start), _clock(end))
            if window.start == window.end:
                raise _bad(f"quiet hours {window} are empty; give two different times")
            found[key] = window
        else:
            raise _bad(f"unknown clause {key!r}")
    if "pending" not in found and "every" not in found:
        raise _bad("give a trigger (pending>=N or every=DURATION); quiet= alone never starts a run")
    return UpdatePolicy(min_pending=found.get("pending"), every_s=found.get("every"),  # type: ignore[arg-type]
                        quiet=found.get("quiet"))  # type: ignore[arg-type]
