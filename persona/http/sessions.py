"""The dashboard's login sessions: a random cookie value mapped, in memory, to the identity of the
token it was made from.

The cookie holds no token and nothing derived from one: ``secrets.token_urlsafe(32)``, looked up
here. Each session also carries its own CSRF token (the hidden field of every form the dashboard
posts), since a cookie is sent by the browser whatever page makes the request. Sessions expire
(``ttl_s`` after login, whatever the activity), are bounded in number (the oldest goes first) and
vanish with the process: a restarted server asks everyone to log in again.

Whether the token behind a session is still valid (not revoked, its user not deleted) is checked
on every use by the caller (:func:`persona.http.ui_auth.identify`), against the store's tokens.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..store.tokens import Scope

SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 4096


@dataclass(frozen=True)
class UiSession:
    """One login: the cookie's value, the form token, who logged in (None: the server runs without
    authentication) and when it expires (``time.monotonic()`` seconds)."""

    sid: str
    csrf: str
    scope: Scope | None
    expires: float

    def csrf_matches(self, sent: str | None) -> bool:
        """Whether a form's CSRF field is this session's (compared in constant time)."""
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())


class SessionStore:
    """The sessions of one server: bounded, expiring, thread-safe.

    >>> sessions = SessionStore()
    >>> s = sessions.create(Scope("t1", "admin"))
    >>> sessions.get(s.sid) == s, sessions.get("guessed")
    (True, None)
    """

    def __init__(self, *, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS, clock=time.monotonic):
        self.ttl_s, self.max_sessions, self._clock = ttl_s, max_sessions, clock
        self._sessions: OrderedDict[str, UiSession] = OrderedDict()  # oldest login first
        self._lock = threading.Lock()

    def create(self, scope: Scope | None) -> UiSession:
        """A new session for ``scope``; past ``max_sessions`` the oldest is dropped."""
        session = UiSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), scope, self._clock() + self.ttl_s)
        with self._lock:
            self._sessions[session.sid] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session

    def get(self, sid: str | None) -> UiSession | None:
        """The live session of a cookie value, or None (unknown, expired: then forgotten)."""
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and session.expires <= self._clock():
                del self._sessions[sid]
                return None
            return session

    def drop(self, sid: str | None) -> None:
        """Forget a session (logout, or its token was revoked)."""
        with self._lock:
            self._sessions.pop(sid or "", None)

    def __len__(self) -> int:
        return len(self._sessions)
