"""Interactions: the training data type, its strict validation, JSON Lines reading and appending, its digest.

An interactions file is JSON Lines, one interaction a line, in one of three formats::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}
    {"text": "..."}

This module is the boundary where that data comes in, so it is strict, and it either returns every
interaction of a file or raises :class:`~persona.errors.InvalidInteractions`; nothing half-read
ever reaches training. It is a core module (the store reads and appends with it), so it never
imports torch; tokenizing is :mod:`persona.training.tokenize`, batching :mod:`persona.training.batches`.

Decisions:

- A bad line is reported as ``{file}:{line}: {reason}``. All bad lines are counted; the first
  :data:`MAX_REPORTED_ERRORS` are listed in one message whose first line gives the count.
- Refused: bytes that are not UTF-8; NUL bytes (a binary file: reading stops there); a line over
  :data:`MAX_LINE_BYTES` (1 MB; past :data:`MAX_SKIPPED_BYTES` without a newline reading stops, so
  ``--data /dev/zero`` or an endless pipe ends with an error instead of hanging); text that is not
  JSON; JSON nested deeper than Python's recursion limit or holding an integer of more digits than
  ``sys.get_int_max_str_digits()``; strings holding a lone surrogate (``"\\ud800"``: not Unicode text,
  so it could never be written back as UTF-8); JSON that is not an object; duplicate keys;
  unknown keys (named, with the allowed ones); keys of two formats in one object; ``prompt``
  without ``completion`` (or the reverse); content that is not a string (``null``, a number, or
  OpenAI's list of content parts); content that is empty or only whitespace; a role other than
  those of :data:`ROLES`; ``system`` anywhere but first; a chat without an assistant
  turn; a message key other than ``role`` and ``content`` (so ``name``, ``weight``, tool calls are
  refused rather than silently ignored); a file with no interactions.
- One optional key beside any format: ``"supersedes": "TEXT"`` (a non-empty string) marks the line
  as a correction: older replay rows whose text contains TEXT stop being replayed or counted by the
  gate (see :mod:`persona.training.supersede`).
- Accepted: blank lines (skipped, but still counted for line numbers); a UTF-8 byte-order mark at
  the start; chats whose turns do not alternate (``user, user, assistant``) or that end on a user
  turn. Every role is valid, and alternation is the chat template's business (checked when the
  chat is tokenized).
- Content is kept exactly as given (no stripping), so the digest is of what the user supplied.
- :func:`data_digest` hashes canonical JSON Lines (sorted keys, no spaces, UTF-8), order-sensitive;
  ``source`` and ``line`` are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InvalidInteractions
from ._fs import open_private_append

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_REPORTED_ERRORS",
    "ROLES",
    "SYSTEM_ALIAS",
    "Interaction",
    "read_interactions",
    "parse_interactions",
    "data_digest",
    "append_jsonl",
]

MAX_LINE_BYTES = 1_000_000
MAX_SKIPPED_BYTES = 16 * MAX_LINE_BYTES
MAX_REPORTED_ERRORS = 20

ROLES = ("system", "user", "assistant")
"""The chat roles, the package's one list: training data takes exactly these. A request to serve
(:class:`~persona.serving.engine.GenerationRequest`, the HTTP API) also takes :data:`SYSTEM_ALIAS`."""
SYSTEM_ALIAS = "developer"  # OpenAI's newer name for system; requests render it as "system"
_FORMATS = 'one of {"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...}'
_ALLOWED_KEYS = ("completion", "messages", "prompt", "supersedes", "text")
_MESSAGE_KEYS = ("content", "role")
_FORMAT_OF_KEY = {
    "messages": "messages",
    "prompt": "prompt/completion",
    "completion": "prompt/completion",
    "text": "text",
}


class _LineError(Exception):
    """A reason a line is bad; turned into ``file:line: reason`` by the caller."""


class _StopReading(_LineError):
    """A reason the rest of the file is not worth reading (reported, and reading stops there)."""


class _BinaryLine(_StopReading):
    """A NUL byte: the file is binary, and reading stops at the first one."""


_BINARY = "contains NUL bytes: this looks like a binary file, not JSON Lines"


# --------------------------------------------------------------------------------------------------
# Interaction


@dataclass(frozen=True)
class Interaction:
    """One training example: a chat, a prompt/completion pair, or a plain text.

    Exactly one format is set: ``messages`` (``(role, content)`` pairs), or ``prompt`` and
    ``completion``, or ``text``. ``source`` and ``line`` say where it came from; they are not part
    of equality, hashing or the digest.

    >>> i = Interaction.from_json({"prompt": "2+2?", "completion": "4"})
    >>> i.format, i.to_json()
    ('completion', {'prompt': '2+2?', 'completion': '4'})
    """

    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    supersedes: str | None = None  # a correction: older rows containing this text are superseded
    source: str = field(default="<input>", compare=False)
    line: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        try:
            if self.messages is not None:
                object.__setattr__(self, "messages", _message_pairs(self.messages))
            _check_interaction(self)
        except _LineError as e:
            raise InvalidInteractions(f"{self.source}:{self.line}: {e}") from None

    @property
    def format(self) -> str:
        """``"chat"``, ``"completion"`` or ``"text"``."""
        if self.messages is not None:
            return "chat"
        return "completion" if self.prompt is not None else "text"

    def to_json(self) -> dict[str, Any]:
        """The interaction in the JSON format it was given in."""
        marker = {"supersedes": self.supersedes} if self.supersedes is not None else {}
        if self.messages is not None:
            return {"messages": [{"role": r, "content": c} for r, c in self.messages], **marker}
        if self.prompt is not None:
            return {"prompt": self.prompt, "completion": self.completion, **marker}
        return {"text": self.text, **marker}

    @classmethod
    def from_json(cls, obj: Any, source: str = "<input>", line: int = 1) -> Interaction:
        """Validate one decoded JSON value; raise :class:`InvalidInteractions` naming ``source:line``.

        >>> Interaction.from_json({"messages": [{"role": "user", "content": "hi"},
        ...                                     {"role": "assistant", "content": "hello"}]}).messages
        (('user', 'hi'), ('assistant', 'hello'))
        """
        try:
            fields = _fields_from_json(obj)
        except _LineError as e:
            raise InvalidInteractions(f"{source}:{line}: {e}") from None
        return cls(**fields, source=source, line=line)


def _message_pairs(messages: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(messages, (str, bytes, dict)):
        raise _LineError(f"messages must be a sequence of (role, content) pairs, got {_type_name(messages)}")
    pairs = []
    for n, m in enumerate(messages):
        if isinstance(m, dict):  # the JSON shape belongs in from_json, which names what is wrong in it
            raise _LineError(f"messages[{n}] is a dict: build chats from JSON with Interaction.from_json")
        if not isinstance(m, (tuple, list)) or len(m) != 2:
            raise _LineError(f"messages[{n}] must be a (role, content) pair")
        pairs.append((m[0], m[1]))
    return tuple(pairs)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _string(value: Any, where: str) -> str:
    if isinstance(value, list) and where.endswith(".content"):
        raise _LineError(f"{where} must be a string, got an array (lists of content parts are not supported)")
    if not isinstance(value, str):
        raise _LineError(f"{where} must be a string, got {_type_name(value)}")
    return value


def _fields_from_json(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object ({_FORMATS}), got {_type_name(obj)}")
    if not obj:
        raise _LineError(f"empty object: expected {_FORMATS}")
    unknown = sorted(k for k in obj if k not in _ALLOWED_KEYS)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise _LineError(f"unknown key{'s' if len(unknown) > 1 else ''} {names} (allowed: {', '.join(_ALLOWED_KEYS)})")
    marker = {"supersedes": _string(obj["supersedes"], "'supersedes'")} if "supersedes" in obj else {}
    formats = sorted({_FORMAT_OF_KEY[k] for k in obj if k in _FORMAT_OF_KEY})
    if not formats:
        raise _LineError(f"'supersedes' marks an interaction: give it beside {_FORMATS}")
    if len(formats) > 1:
        raise _LineError(f"mixes formats {' and '.join(formats)} in one object: use {_FORMATS}")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list):
            raise _LineError(f"'messages' must be an array of {{role, content}} objects, got {_type_name(raw)}")
        messages = []
        for n, m in enumerate(raw):
            if not isinstance(m, dict):
                raise _LineError(f"messages[{n}] must be an object with 'role' and 'content', got {_type_name(m)}")
            extra = sorted(k for k in m if k not in _MESSAGE_KEYS)
            if extra:
                raise _LineError(
                    f"messages[{n}] has unknown key{'s' if len(extra) > 1 else ''} "
                    f"{', '.join(repr(k) for k in extra)} (allowed: role, content)"
                )
            for key in _MESSAGE_KEYS:
                if key not in m:
                    raise _LineError(f"messages[{n}] has no '{key}'")
            messages.append(
                (_string(m["role"], f"messages[{n}].role"), _string(m["content"], f"messages[{n}].content"))
            )
        return {"messages": tuple(messages), **marker}
    if "prompt" in obj or "completion" in obj:
        for key, partner in (("prompt", "completion"), ("completion", "prompt")):
            if key not in obj:
                raise _LineError(f"'{partner}' needs '{key}' beside it")
        return {"prompt": _string(obj["prompt"], "'prompt'"), "completion": _string(obj["completion"], "'completion'"),
                **marker}
    return {"text": _string(obj["text"], "'text'"), **marker}


def _check_text(value: str, where: str) -> None:
    """Refuse a lone surrogate (JSON's ``"\\ud800"``): it is not text, and could never be written as UTF-8."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _LineError(
            f"{where} holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start + 1}): not valid Unicode text"
        ) from None


def _check_interaction(i: Interaction) -> None:
    """The invariants of an Interaction, whoever built it (a file, the server, a test)."""
    given = [name for name in ("messages", "prompt", "completion", "text") if getattr(i, name) is not None]
    if not given:
        raise _LineError(f"no content: expected {_FORMATS}")
    if i.supersedes is not None and (not isinstance(i.supersedes, str) or not i.supersedes.strip()):
        raise _LineError("'supersedes' must be a non-empty string (text of the older rows it replaces)")
    if (i.messages is not None or i.text is not None) and len(given) > 1:
        raise _LineError(f"mixes formats ({', '.join(given)}): use {_FORMATS}")
    if i.messages is not None:
        if not i.messages:
            raise _LineError("'messages' is empty: a chat needs at least one assistant turn")
        for n, m in enumerate(i.messages):
            if len(m) != 2 or not all(isinstance(x, str) for x in m):
                raise _LineError(f"messages[{n}] must be a (role, content) pair of strings")
            role, content = m
            if role not in ROLES:
                raise _LineError(f"messages[{n}].role is {role!r}: a role must be one of {', '.join(ROLES)}")
            if role == "system" and n != 0:
                raise _LineError(f"messages[{n}] is a system message: only the first message may be 'system'")
            if not content.strip():
                raise _LineError(f"messages[{n}].content is empty")
            _check_text(content, f"messages[{n}].content")
        if not any(role == "assistant" for role, _ in i.messages):
            raise _LineError("the chat has no assistant turn, so there is nothing to learn from it")
        return
    for name in given:
        value = getattr(i, name)
        if not isinstance(value, str):
            raise _LineError(f"'{name}' must be a string, got {_type_name(value)}")
        if not value.strip():
            raise _LineError(f"'{name}' is empty")
        _check_text(value, f"'{name}'")
    if (i.prompt is None) != (i.completion is None):
        raise _LineError("'prompt' and 'completion' go together")


# --------------------------------------------------------------------------------------------------
# Reading


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _LineError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _parse_line(text: str) -> dict[str, Any]:
    if "\x00" in text:
        raise _BinaryLine(_BINARY)
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise _LineError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # issue 10: a line of 200,000 nested arrays
        raise _LineError("JSON nested too deeply: an interaction is an object of strings") from None
    except ValueError as e:  # issue 10: Python's limit on digits of an integer (e.g. 5,000 of them)
        raise _LineError(f"not usable JSON ({str(e).split(':')[0].strip().lower()})") from None
    return _fields_from_json(obj)


def _too_long(size: int) -> str:
    return f"line is {size:,} bytes, over the limit of {MAX_LINE_BYTES:,} bytes a line; shorten or split it"


def _iter_file_lines(f: BinaryIO) -> Iterator[tuple[bytes | _LineError | None, int]]:
    """Yield ``(line, size)``, size without the newline; ``line`` is None when over the limit, or
    the reason reading stops (a binary file, a line without end)."""
    while True:
        chunk = f.readline(MAX_LINE_BYTES + 1)
        if not chunk:
            return
        size = len(chunk.rstrip(b"\r\n"))
        if size <= MAX_LINE_BYTES:
            yield chunk, size
            continue
        if b"\x00" in chunk:  # /dev/zero or any binary file: no need to find the line's end
            yield _BinaryLine(_BINARY), size
            return
        while not chunk.endswith(b"\n"):  # skip the rest of the long line without holding it
            if size > MAX_SKIPPED_BYTES:  # an endless stream (a pipe, a device) must not hang us
                yield _StopReading(
                    f"line is over {MAX_SKIPPED_BYTES:,} bytes without a newline: not JSON Lines; reading stopped"
                ), size
                return
            chunk = f.readline(1 << 20)
            size += len(chunk.rstrip(b"\r\n"))
            if not chunk:
                break
        yield None, size


def _collect(items: Iterable[tuple[int, bytes | str | _LineError | None, int]], source: str) -> list[Interaction]:
    """Validate numbered lines; return every interaction or raise one error listing the bad lines."""
    interactions: list[Interaction] = []
    errors: list[str] = []
    bad = 0
    for number, raw, size in items:
        try:
            if raw is None:
                raise _LineError(_too_long(size))
            if isinstance(raw, _LineError):
                raise raw
            if isinstance(raw, bytes):
                if b"\x00" in raw:
                    raise _BinaryLine(_BINARY)
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _LineError(f"not valid UTF-8 (byte {e.start + 1}): save the file as UTF-8") from None
            if number == 1:
                raw = raw.removeprefix("\ufeff")
            if not raw.strip():
                continue
            fields = _parse_line(raw)
            interactions.append(Interaction(**fields, source=source, line=number))
        except (_LineError, InvalidInteractions) as e:
            bad += 1
            reason = str(e).removeprefix(f"{source}:{number}: ")
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"{source}:{number}: {reason}")
            if isinstance(e, _StopReading):  # the rest of a binary file is noise
                break
    if bad == 1:
        raise InvalidInteractions(errors[0])
    if bad:
        shown = f" (the first {len(errors)} below)" if bad > len(errors) else ""
        head = f"{bad} bad lines in {source}{shown}; nothing was read. Fix them and try again:"
        raise InvalidInteractions("\n".join([head, *errors]))
    if not interactions:
        raise InvalidInteractions(
            f"{source}: the file is empty (no interactions); give at least one line in {_FORMATS}"
        )
    return interactions


def read_interactions(path: str | os.PathLike[str]) -> list[Interaction]:
    """Read and validate a JSON Lines file; all its interactions, or :class:`InvalidInteractions`.

    A missing file raises ``FileNotFoundError`` as usual.

    >>> read_interactions("examples/interactions/alice.jsonl")[0].format   # doctest: +SKIP
    'chat'
    """
    path = Path(path)
    source = str(path)
    with open(path, "rb") as f:
        numbered = ((n, raw, size) for n, (raw, size) in enumerate(_iter_file_lines(f), start=1))
        return _collect(numbered, source)


def parse_interactions(lines: Iterable[str] | str, source: str = "<input>") -> list[Interaction]:
    """Validate JSON Lines given as text (an iterable of lines, or one string holding them all).

    >>> parse_interactions(['{"text": "hello"}', '', '{"prompt": "a", "completion": "b"}'])[1].line
    3
    """
    if isinstance(lines, str):
        lines = lines.splitlines()

    def numbered() -> Iterator[tuple[int, str | None, int]]:
        for n, line in enumerate(lines, start=1):
            # characters <= UTF-8 bytes <= 4 * characters: encode only when it could matter
            size = len(line.rstrip("\r\n"))
            if 4 * size > MAX_LINE_BYTES:
                size = len(line.rstrip("\r\n").encode("utf-8", "surrogatepass"))
            yield n, (line if size <= MAX_LINE_BYTES else None), size

    return _collect(numbered(), source)


# --------------------------------------------------------------------------------------------------
# Digest and appending


def _canonical_line(i: Interaction) -> bytes:
    return (json.dumps(i.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def data_digest(interactions: Iterable[Interaction]) -> str:
    """sha256 (hex) of the interactions as canonical JSON Lines; order matters, provenance does not.

    >>> data_digest([Interaction(text="hi")]) == data_digest([Interaction(text="hi", line=7)])
    True
    """
    h = hashlib.sha256()
    for i in interactions:
        h.update(_canonical_line(i))
    return h.hexdigest()


def append_jsonl(path: str | os.PathLike[str], interactions: Iterable[Interaction], *, private: bool = False) -> int:
    """Append interactions to a JSON Lines file in one write, then fsync; return how many.

    If a crash once left the file without a final newline, a newline is written first, so the
    torn line stays a line of its own (and is reported by :func:`read_interactions`) instead of
    corrupting the first appended one. ``private=True`` (a store's pending queue) creates the file
    with mode 0600 and refuses a symlink or anything but a plain file.

    >>> append_jsonl("adapters/user/alice/pending.jsonl", [Interaction(text="hi")])  # doctest: +SKIP
    1
    """
    items = list(interactions)
    for i in items:
        if not isinstance(i, Interaction):
            raise TypeError(f"append_jsonl takes Interaction objects, got {type(i).__name__}")
    if not items:
        return 0
    data = b"".join(_canonical_line(i) for i in items)
    fd = open_private_append(Path(path)) if private else os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+b", buffering=0) as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        view = memoryview(data)
        while view:  # one write(2) for a regular file; the loop only covers a short write
            view = view[f.write(view) :]
        os.fsync(f.fileno())
    return len(items)
