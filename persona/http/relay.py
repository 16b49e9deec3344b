"""Passing an upstream's server-sent events through to the client, event by event.

:class:`SseRelay` is fed the upstream's bytes as they arrive and returns every event that is
complete (nothing waits for more than the rest of its own event), with ``model`` set to the
name the client sent (what persona's own server answers) and choice 0's text collected for the
interaction log. Everything else in an event is passed on as it came.

>>> relay = SseRelay("user:alice", chat=True)
>>> relay.feed(b'data: {"model": "user:alice@v3", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}\\n\\nda')
b'data: {"model": "user:alice", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}\\n\\n'
>>> relay.feed(b'ta: [DONE]\\n\\n'), relay.text, relay.finished
(b'data: [DONE]\\n\\n', 'Hi', True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = b"data: [DONE]"


@dataclass(frozen=True)
class Usage:
    """Token counts an upstream reported (what :meth:`persona.http.metrics.Metrics.record` reads)."""

    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, usage: Any) -> "Usage | None":
        """From an OpenAI ``usage`` object; None when it is missing or malformed."""
        if not isinstance(usage, dict):
            return None
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (prompt, completion)):
            return None
        return cls(prompt, completion)


def choice_text(body: Any, *, chat: bool, streamed: bool) -> str | None:
    """Choice 0's text in an answer (``message.content``) or a chunk (``delta.content``, or ``text``)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return None
    for choice in body["choices"]:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        if not chat:
            text = choice.get("text")
        else:
            holder = choice.get("delta" if streamed else "message")
            text = holder.get("content") if isinstance(holder, dict) else None
        return text if isinstance(text, str) else None
    return None


class SseRelay:
    """One streamed answer's events: rewrite ``model``, collect choice 0's text, note usage and errors."""

    def __init__(self, model: str, *, chat: bool):
        self.model, self.chat = model, chat
        self.finished = False  # ``data: [DONE]`` came
        self.failed = False  # an error event came
        self.usage: Usage | None = None
        self._pieces: list[str] = []
        self._buffer = b""

    @property
    def text(self) -> str:
        """Choice 0's text so far."""
        return "".join(self._pieces)

    def feed(self, data: bytes) -> bytes:
        """The complete events in what has arrived so far (``b""`` while an event is still partial)."""
        self._buffer += data
        if b"\r" in self._buffer:  # SSE allows CRLF; events are re-sent with LF
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        complete, sep, self._buffer = self._buffer.rpartition(b"\n\n")
        if not sep:
            return b""
        return b"".join(self._event(event) for event in complete.split(b"\n\n"))

    def flush(self) -> bytes:
        """Whatever the upstream sent after its last complete event (normally nothing)."""
        rest, self._buffer = self._buffer, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, event: bytes) -> bytes:
        if event.strip() == DONE:
            self.finished = True
            return DONE + b"\n\n"
        if not event.startswith(b"data:"):
            return event + b"\n\n"  # a comment, or an event type persona does not send: as it came
        try:
            body = json.loads(event[len(b"data:"):])
        except ValueError:
            return event + b"\n\n"
        if isinstance(body, dict):
            if "model" in body:
                body["model"] = self.model
            if "error" in body:
                self.failed = True
            self.usage = Usage.of(body.get("usage")) or self.usage
            text = choice_text(body, chat=self.chat, streamed=True)
            if text:
                self._pieces.append(text)
        return b"data: " + json.dumps(body).encode() + b"\n\n"
