"""Bearer tokens for the HTTP server, stored hashed in the store.

A token is ``psn_<id>_<secret>``. Only ``sha256(secret)`` is kept, in ``ROOT/tokens.json`` next to
the token's scope: ``user:NAME`` (that user's adapters plus the shared domain adapters) or
``admin`` (everything). The id makes lookup O(1); the secret is compared in constant time.

Access rule (``Scope.allows``): a user token reaches its own ``user:NAME`` adapter (any version or
alias) and every ``domain:*`` adapter, alone or in stacks, weighted or not (every part is checked;
a weight never widens access), and the base model. Merged adapters may hold several users' data, so
they are admin-only. Anything not allowed is reported by the server exactly as an unknown adapter
is (404), so a token cannot probe which users exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import AuthError, InvalidReference
from .._fs import PRIVATE_MODE, atomic_write_json, read_regular_file
from ..refs import AdapterRef, StackPart, parse_ref

if TYPE_CHECKING:
    from .protocol import StoreView

TOKENS_FILE = "tokens.json"
ADMIN = "admin"
PREFIX = "psn_"


@dataclass(frozen=True)
class Scope:
    """What one token may reach."""

    token_id: str
    subject: str  # "admin" or "user:NAME"

    @property
    def is_admin(self) -> bool:
        return self.subject == ADMIN

    def allows(self, parts: Sequence[AdapterRef | StackPart]) -> bool:
        """Whether every part may be reached; a part's weight changes nothing about who may use it."""
        if self.is_admin:
            return True
        refs = [p.ref if isinstance(p, StackPart) else p for p in parts]
        if not all(isinstance(r, AdapterRef) for r in refs):
            raise TypeError("Scope.allows takes adapter references or stack parts")
        return all(r.kind == "domain" or (r.kind == "user" and r.id == self.subject) for r in refs)


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    subject: str
    created: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """The tokens of one adapter store (``Store.root / tokens.json``); reach it as ``store.tokens``."""

    def __init__(self, store: StoreView):
        self.store = store
        self.path = store.root / TOKENS_FILE

    def _lock(self):
        """The store's lock of ``tokens.json`` (:class:`~persona.errors.LockTimeout` after the store's timeout)."""
        return self.store._file_lock("tokens", "another writer has held the lock of the API tokens")

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(read_regular_file(self.path))["tokens"]  # never through a planted symlink
        except FileNotFoundError:
            return {}

    def _write(self, tokens: dict[str, dict[str, str]]) -> None:
        # Created 0600 (the temp file too): a chmod after the rename left it 0644 while being written.
        atomic_write_json(self.path, {"tokens": tokens}, PRIVATE_MODE)

    def create(self, subject: str) -> tuple[str, TokenInfo]:
        """Issue a token for ``admin`` or a ``user:NAME`` adapter; the secret is shown once, never stored."""
        if subject != ADMIN:
            ref = parse_ref(subject)
            if ref.kind != "user" or ref.version is not None or ref.alias is not None:
                raise InvalidReference(f"tokens are issued for a user adapter (user:NAME) or --admin, not {subject!r}")
            self.store.show(ref)  # the user must exist
            subject = ref.id
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24)
        info = TokenInfo(token_id, subject, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self._lock():
            tokens = self._read()
            tokens[token_id] = {"sha256": _hash(secret), "subject": subject, "created": info.created}
            self._write(tokens)
        return f"{PREFIX}{token_id}_{secret}", info

    def list(self) -> list[TokenInfo]:
        return [TokenInfo(tid, t["subject"], t["created"]) for tid, t in sorted(self._read().items())]

    def revoke(self, token_id: str) -> None:
        with self._lock():
            tokens = self._read()
            if tokens.pop(token_id, None) is None:
                raise AuthError(f"no token with id {token_id!r} (see `persona token list`)")
            self._write(tokens)

    def revoke_subject(self, subject: str) -> int:
        """Revoke every token of a subject (used when its adapter is deleted)."""
        with self._lock():
            tokens = self._read()
            doomed = [tid for tid, t in tokens.items() if t["subject"] == subject]
            for tid in doomed:
                del tokens[tid]
            if doomed:
                self._write(tokens)
        return len(doomed)

    def authenticate(self, bearer: str | None) -> Scope:
        """The scope of a ``psn_<id>_<secret>`` token; :class:`AuthError` if it is not valid."""
        if not bearer or not bearer.startswith(PREFIX):
            raise AuthError("missing or malformed bearer token")
        token_id, sep, secret = bearer[len(PREFIX):].partition("_")
        entry = self._read().get(token_id) if sep else None
        if entry is None or not hmac.compare_digest(entry["sha256"], _hash(secret)):
            raise AuthError("invalid or revoked token")
        return Scope(token_id, entry["subject"])

    def still_valid(self, scope: Scope) -> bool:
        """Whether the token behind ``scope`` still exists for the same subject (not revoked, its
        user not deleted): what a session made from the token checks on each use (the secret is
        not kept, so only the id is looked up)."""
        entry = self._read().get(scope.token_id)
        return entry is not None and entry["subject"] == scope.subject
