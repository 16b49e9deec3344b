"""Admission limits for the server: how much work may be in the engine at once, in all and per token.

>>> gate = AdmissionGate(max_total=64, max_per_key=8)
>>> ticket = gate.admit("token-id")       # raises Overloaded when a limit is reached
>>> ticket.watch(handle)                  # doctest: +SKIP   (released when the request ends; n choices: watch(*handles))
>>> gate.in_flight
1

A request holds its ticket from admission until the engine finishes or fails it (a cancelled
request is released at the decode step that stops it), so the limits count the engine's real work,
not open connections. ``cancel_all`` cancels every watched request (used when the server stops).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..serving.requests import when_all_done
from ..errors import InvalidConfig, Overloaded

if TYPE_CHECKING:
    from ..serving.requests import Handle


class Ticket:
    """One admitted request's place; ``release`` is idempotent."""

    def __init__(self, gate: "AdmissionGate", key: str | None):
        self._gate, self._key = gate, key
        self._released = False
        self.handles: tuple["Handle", ...] = ()

    def watch(self, *handles: "Handle") -> None:
        """Release this ticket when every one of ``handles`` (a request's choices) has finished or failed."""
        self.handles = handles
        when_all_done(handles, self.release)

    def release(self) -> None:
        self._gate._release(self)


class AdmissionGate:
    """Bounds requests in flight: ``max_total`` in all, ``max_per_key`` per key (a token id).

    A key of None (no authentication) is bounded by ``max_total`` only.
    """

    def __init__(self, max_total: int, max_per_key: int):
        for name, value in (("max_total", max_total), ("max_per_key", max_per_key)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfig(f"{name} must be a positive integer, got {value!r}")
        self.max_total, self.max_per_key = max_total, max_per_key
        self._lock = threading.Lock()
        self._live: set[Ticket] = set()
        self._per_key: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def admit(self, key: str | None) -> Ticket:
        """A ticket for one more request; ``Overloaded`` (naming the limit) when one is reached."""
        with self._lock:
            if len(self._live) >= self.max_total:
                raise Overloaded(f"the server is at its limit of {self.max_total} requests in flight; retry shortly")
            if key is not None and self._per_key.get(key, 0) >= self.max_per_key:
                raise Overloaded(f"this token already has {self.max_per_key} requests in flight (the per-token limit); "
                                 "wait for one to finish")
            ticket = Ticket(self, key)
            self._live.add(ticket)
            if key is not None:
                self._per_key[key] = self._per_key.get(key, 0) + 1
            return ticket

    def cancel_all(self) -> int:
        """Cancel every watched request still in flight; how many were asked to stop."""
        with self._lock:
            handles = [h for t in self._live for h in t.handles]
        return sum(bool(h.cancel()) for h in handles)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            self._live.discard(ticket)
            if ticket._key is not None:
                left = self._per_key[ticket._key] - 1
                if left:
                    self._per_key[ticket._key] = left
                else:
                    del self._per_key[ticket._key]
