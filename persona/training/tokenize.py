"""Tokenization of interactions for causal-LM training, with loss only on what the model should say.

Decisions:

- Loss is on assistant content plus the end-of-turn marker that follows it (``<|im_end|>`` for
  ChatML), found by rendering the conversation with the base tokenizer's chat template and mapping
  character spans to tokens through the fast tokenizer's offsets. A token that overlaps a trained
  span is trained. ``prompt``/``completion`` is rendered as a two-turn chat (user, assistant), so
  training matches inference through the same template; without a chat template it is
  ``prompt + completion + eos`` (no separator is added). ``text`` is trained on every token, with
  eos appended.
- Alternation is the chat template's business: a template that refuses a chat (``user, user``,
  say) is reported by :func:`tokenize_interactions` with the file and line.
- Truncation keeps the start. ``TokenizedSet.truncated`` counts examples that were cut and kept;
  ``TokenizedSet.dropped`` counts examples left with nothing to train on (no target after the
  first position, which a causal LM never predicts). The two counts do not overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidConfig, InvalidInteractions
from ..interactions import Interaction

__all__ = ["IGNORE_INDEX", "Example", "TokenizedSet", "tokenize_interactions"]

IGNORE_INDEX = -100


class _Unplaceable(Exception):
    """The chat template does not reproduce a message; reported as ``file:line: reason``."""


@dataclass(frozen=True)
class Example:
    """A tokenized interaction: ``labels`` is ``input_ids`` with ``-100`` where no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str = field(default="<input>", compare=False)
    line: int = field(default=1, compare=False)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass(frozen=True)
class TokenizedSet:
    """The examples of a set of interactions, with what truncation cost (never silent)."""

    examples: tuple[Example, ...]
    truncated: int
    dropped: int
    max_length: int

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def num_target_tokens(self) -> int:
        return sum(e.num_target_tokens for e in self.examples)


def _render(tokenizer: Any, messages: Sequence[tuple[str, str]], generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):
        raise InvalidConfig("the tokenizer's apply_chat_template(tokenize=False) did not return text")
    return text


def _find_content(text: str, content: str, start: int) -> tuple[int, int]:
    pos = text.find(content, start)
    if pos >= 0:
        return pos, pos + len(content)
    stripped = content.strip()  # some templates trim message content
    pos = text.find(stripped, start)
    if pos >= 0:
        return pos, pos + len(stripped)
    raise _Unplaceable("the chat template does not reproduce a message's content verbatim; cannot place the loss")


def _generation_prompt(tokenizer: Any) -> str:
    """What the template writes to open an assistant turn (``<|im_start|>assistant\\n`` in ChatML)."""
    probe = (("user", "x"),)
    head, plain = _render(tokenizer, probe, generation_prompt=True), _render(tokenizer, probe)
    return head[len(plain) :] if head.startswith(plain) else ""


def _assistant_start(tokenizer: Any, full: str, before: Sequence[tuple[str, str]], cursor: int) -> int:
    """Where the assistant turn after ``before`` begins in ``full``: the end of its generation prompt."""
    if before:
        try:
            head = _render(tokenizer, before, generation_prompt=True)
        except Exception:  # some templates refuse a partial conversation
            head = ""
        if head and full.startswith(head):
            return len(head)
    # Not incremental (an assistant turn first, after a default system prompt, say).
    opener = _generation_prompt(tokenizer)
    pos = full.find(opener, cursor) if opener else -1
    return pos + len(opener) if pos >= 0 else cursor


def _chat_spans(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans to train on: assistant content + end-of-turn.

    Each assistant turn starts where the prefix conversation rendered with a generation prompt
    ends; its end-of-turn marker is what the template writes after the content (whitespace aside).
    A template that does not render incrementally falls back to finding the content in order.
    """
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for n, (role, content) in enumerate(messages):
        if role != "assistant":
            try:
                cursor = _find_content(full, content, cursor)[1]
            except _Unplaceable:  # a template may fold or drop a non-assistant message; no loss there
                pass
            continue
        start, end = _find_content(full, content, _assistant_start(tokenizer, full, messages[:n], cursor))
        turn = _render(tokenizer, messages[: n + 1])
        marker = turn[end:].strip() if full.startswith(turn) and len(turn) >= end else ""
        if not marker and tokenizer.eos_token and full.startswith(tokenizer.eos_token, end):
            marker = tokenizer.eos_token
        if marker and full.startswith(marker, end):
            end += len(marker)
        spans.append((start, end))
        cursor = end
    return full, spans


def _encode(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], *, special: bool, eos: bool
) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    s = 0
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b <= a:
            continue  # added special tokens (bos) have no characters
        while s < len(spans) and spans[s][1] <= a:
            s += 1
        if s < len(spans) and spans[s][0] < b:
            labels[j] = ids[j]
    if eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if spans else IGNORE_INDEX)
    return ids, labels


def _tokenize_one(tokenizer: Any, i: Interaction) -> tuple[list[int], list[int]]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if i.messages is not None:
        if not has_template:
            raise InvalidConfig("the tokenizer has no chat template, so chat interactions cannot be rendered")
        text, spans = _chat_spans(tokenizer, i.messages)
        return _encode(tokenizer, text, spans, special=False, eos=False)
    if i.prompt is not None and has_template:
        text, spans = _chat_spans(tokenizer, (("user", i.prompt), ("assistant", i.completion or "")))
        return _encode(tokenizer, text, spans, special=False, eos=False)
    if i.prompt is not None:
        text = i.prompt + (i.completion or "")
        return _encode(tokenizer, text, [(len(i.prompt), len(text))], special=True, eos=True)
    text = i.text or ""
    return _encode(tokenizer, text, [(0, len(text))], special=True, eos=True)


def tokenize_interactions(interactions: Iterable[Interaction], tokenizer: Any, max_length: int = 1024) -> TokenizedSet:
    """Tokenize for causal-LM training, with loss only on what the model should learn to say.

    Needs a fast (offset-mapping) tokenizer. Chats and prompt/completion pairs go through the
    tokenizer's chat template; see the module docstring for exactly which tokens are trained.

    >>> ts = tokenize_interactions(read_interactions("alice.jsonl"), tok, max_length=512)  # doctest: +SKIP
    >>> ts.truncated, ts.dropped   # doctest: +SKIP
    (0, 0)
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise InvalidConfig(f"max_length must be an integer >= 2, got {max_length!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidConfig("tokenize_interactions needs a fast tokenizer (one that returns offset mappings)")
    examples: list[Example] = []
    truncated = dropped = 0
    for i in interactions:
        try:
            ids, labels = _tokenize_one(tokenizer, i)
        except _Unplaceable as e:
            raise InvalidInteractions(f"{i.source}:{i.line}: {e}") from None
        except (InvalidConfig, InvalidInteractions):
            raise
        except Exception as e:  # the template raised (jinja's raise_exception, e.g. on alternation)
            raise InvalidInteractions(f"{i.source}:{i.line}: the tokenizer's chat template refused it: {e}") from e
        cut = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        # position 0 is never predicted by a causal LM, so a target there alone trains nothing
        if all(x == IGNORE_INDEX for x in labels[1:]):
            dropped += 1
            continue
        truncated += cut
        examples.append(Example(tuple(ids), tuple(labels), source=i.source, line=i.line))
    return TokenizedSet(tuple(examples), truncated=truncated, dropped=dropped, max_length=max_length)


