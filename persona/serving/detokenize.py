"""Token ids to text as they are generated: incremental decoding and stop strings.

Decoding one token at a time goes wrong in two ways: a multi-byte character spread over several
tokens decodes to U+FFFD until its last byte arrives, and tokenizers that drop the leading space of
a sequence (SentencePiece) lose spaces at token boundaries. ``TextStream`` follows the approach of
vLLM and TGI: decode a short window that starts a few tokens back (seeded with the end of the
prompt), and emit only what the window adds, once it no longer ends in an incomplete character.

Stop strings: text is emitted only up to the point where it can no longer turn out to be the start
of a stop string, so a stream never shows text that the final result leaves out.
"""

from __future__ import annotations

from typing import Any, Sequence

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first new ones, for correct leading spaces
_INCOMPLETE = "\ufffd"


class TextStream:
    """The text of one generated sequence, fed a token at a time.

    >>> stream = TextStream(tokenizer, prompt_ids, stop=("\\n\\n",))   # doctest: +SKIP
    >>> delta = stream.add(token_id)        # text safe to show now ('' while undecided)
    >>> stream.stopped, stream.text         # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # everything decoded so far (may run past a stop string)
        self._emitted = 0  # characters of _text already handed out
        self._searched = 0  # _text before this index holds no stop string
        self.stopped = False  # a stop string was found; no more text follows

    @property
    def text(self) -> str:
        """The final text: what has been decoded, cut before the first stop string."""
        return self._text if not self.stopped else self._text[: self._emitted]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Take one token; return the newly safe text ('' if none)."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return ""  # nothing new yet, or a character still waiting for its last bytes
        self._text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release()

    def finish(self) -> str:
        """The sequence ended (EOS or length): return whatever text is still held back."""
        if self.stopped:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix):  # trailing bytes of an unfinished character, as U+FFFD
            self._text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        released = self._release()
        if self.stopped:
            return released
        rest = self._text[self._emitted :]
        self._emitted = len(self._text)
        return released + rest

    def _release(self) -> str:
        start = self._emitted
        if self.stop:
            begin = max(0, self._searched - self._longest_stop + 1)
            hits = [i for s in self.stop if (i := self._text.find(s, begin)) != -1]
            if hits:
                self.stopped = True
                self._emitted = max(start, min(hits))
                return self._text[start : self._emitted]
            self._searched = len(self._text)
            safe = len(self._text) - self._held_back()
        else:
            safe = len(self._text)
        if safe <= start:
            return ""
        self._emitted = safe
        return self._text[start:safe]

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        tail = self._text[-self._longest_stop :] if self._longest_stop else ""
        for k in range(min(len(tail), self._longest_stop - 1), 0, -1):
            end = tail[-k:]
            if any(s.startswith(end) for s in self.stop):
                return k
        return 0
