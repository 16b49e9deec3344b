"""Memories in the prompt (issue 16): before a chat request is tokenized, the best entries of its user
adapters' memories (:mod:`persona.store.memory`) go into a system message.

Which memories: those of the **user parts** of the stack the request resolved to (its scope was
checked like the adapter's, so no other user's memory is reachable); a domain part, a layer, a
``domain:auto`` choice or the base alone bring none. The query is the last user message. The best
``k`` entries (``retrieval="fused"``, the default: BM25 fused by reciprocal rank with the cosine of
the base's own sentence embeddings, :func:`persona.store.memory.search`; ``"bm25"``: BM25 alone,
entries sharing no word left out) are kept, best first, while their lines fit
``max_tokens`` (counted with the base's tokenizer); an entry that does not fit is skipped for a
shorter one. The template (docs/MEMORY.md)::

    Notes from earlier conversations with this user, most relevant first. Use them if they help:
    - User: My cat is called Tom. Assistant: Noted.
    - ...

It is appended to the request's first message when that is a system message (after a blank line),
else sent as a new first system message (which replaces a chat template's default system prompt, as
any system message does). Raw-prompt requests have no chat to put a system message in: memory is
not applied to them, and a request that asks for it explicitly is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidConfig
from ..refs import StackPart
from ..store.memory import MAX_K, TextEmbedder

__all__ = ["MEMORY_HEADER", "MemoryConfig", "PromptMemory", "Recalled"]

RETRIEVALS = ("fused", "bm25")
MAX_CHARS_PER_TOKEN = 32  # a line longer than this per token of budget left is skipped untokenized (no real text averages more)
MEMORY_HEADER = "Notes from earlier conversations with this user, most relevant first. Use them if they help:"


@dataclass(frozen=True)
class MemoryConfig:
    """How an engine uses memories (``Engine(memory=...)``, ``persona serve --memory``).

    ``default``: whether a request that does not say (``GenerationRequest.memory`` None, no
    ``"memory"`` in the body) gets memories; a request's own ``memory=True/False`` always wins.
    ``k``: at most this many entries; ``max_tokens``: the most tokens their lines may take.
    ``retrieval``: ``"fused"`` (BM25 and the base's sentence embeddings, by reciprocal rank fusion;
    one base forward per new entry and per request; the default, as it retrieved more on every
    memory of benchmarks/memory.py) or ``"bm25"`` (lexical only; no forward).
    """

    # metadata: help and range, from which the CLI builds --memory-k/--memory-tokens (persona.cli._common)
    default: bool = True
    k: int = field(default=4, metadata={"help": "Memory: at most this many entries per request.",
                                        "range": {"min": 1, "max": MAX_K}})
    max_tokens: int = field(default=256, metadata={"help": "Memory: the most tokens its entries "
                                                   "may take in the prompt.", "range": {"min": 1, "max": 1 << 16}})
    retrieval: Literal["fused", "bm25"] = field(default="fused", metadata={
        "help": "Memory: how entries are found: fused (BM25 + the base's own sentence embeddings, one "
                "base forward per request and per new entry) or bm25 (stemmed words only)."})

    def __post_init__(self) -> None:
        if not isinstance(self.default, bool):
            raise InvalidConfig(f"memory default must be true or false, got {self.default!r}")
        for name, value, low, high in (("k", self.k, 1, MAX_K), ("max_tokens", self.max_tokens, 1, 1 << 16)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidConfig(f"memory {name} must be an integer in {low}..{high}, got {value!r}")
        if self.retrieval not in RETRIEVALS:
            raise InvalidConfig(f"memory retrieval must be one of {', '.join(RETRIEVALS)}, got {self.retrieval!r}")

    @classmethod
    def of(cls, value: MemoryConfig | bool | None) -> MemoryConfig:
        """``Engine(memory=...)``: None or False: requests opt in; True: on by default; a config as it is."""
        if isinstance(value, MemoryConfig):
            return value
        if value is None or isinstance(value, bool):
            return cls(default=bool(value))
        raise InvalidConfig(f"memory must be a MemoryConfig, True or False, got {type(value).__name__}")


@dataclass(frozen=True)
class Recalled:
    """A request's messages as they will be tokenized, and the ids of the memories put in them."""

    messages: tuple[Mapping[str, str], ...] | None
    ids: tuple[str, ...] = ()


class PromptMemory:
    """Retrieval and prompt building for one engine (thread-safe: the tokenizer is used under ``lock``).

    ``embedder`` embeds texts with the engine's base (``retrieval="fused"``); without one, BM25 alone.
    """

    def __init__(self, store, config: MemoryConfig, tokenizer: Any, lock: threading.Lock,
                 embedder: TextEmbedder | None = None):
        self.store, self.config, self._tokenizer, self._lock = store, config, tokenizer, lock
        self._embedder = embedder if config.retrieval == "fused" else None

    def recall(self, request, parts: Sequence[StackPart]) -> Recalled:
        """The request's messages with its memories inserted (unchanged when memory is off or finds nothing)."""
        wanted = self.config.default if request.memory is None else request.memory
        if not wanted:
            return Recalled(request.messages)
        if request.messages is None:
            if request.memory:
                raise InvalidConfig("memory goes into a system message, so it needs chat messages, not a raw prompt")
            return Recalled(None)
        users = list(dict.fromkeys(p.ref.unpinned() for p in parts if p.ref.kind == "user"))
        query = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        if not users or not query.strip():
            return Recalled(request.messages)
        hits = [hit for ref in users for hit in self.store.memory(ref).search(query, self.config.k, self._embedder)]
        hits.sort(key=lambda h: -h.score)
        lines, ids, used = [], [], 0
        for hit in hits[: self.config.k]:
            line = "- " + " ".join(hit.entry.text.split())
            if len(line) > MAX_CHARS_PER_TOKEN * (self.config.max_tokens - used):
                continue  # cannot fit: not worth tokenizing (a logged line may hold up to 1 MB)
            cost = self._count(line + "\n")
            if used + cost > self.config.max_tokens:
                continue  # a shorter one further down may still fit
            lines.append(line)
            ids.append(hit.entry.id)
            used += cost
        if not lines:
            return Recalled(request.messages)
        return Recalled(with_memories(request.messages, "\n".join([MEMORY_HEADER, *lines])), tuple(ids))

    def _count(self, text: str) -> int:
        with self._lock:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])


def with_memories(messages: Sequence[Mapping[str, str]], block: str) -> tuple[Mapping[str, str], ...]:
    """``messages`` with ``block`` appended to their system message, or as a new first system message."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{block}"
        return (first, *messages[1:])
    return ({"role": "system", "content": block}, *messages)
