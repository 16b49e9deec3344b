"""Constrained decoding: JSON output (``response_format``) by masking each row's logits with a grammar.

>>> fmt = ResponseFormat.from_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
>>> SamplingParams(max_new_tokens=64, response_format=fmt)            # doctest: +SKIP

The grammar engine is llguidance (https://github.com/guidance-ai/llguidance), one of vLLM's and
SGLang's structured-output backends: a matcher per row, advanced one token at a time, gives the set of
allowed next tokens as a bitmask in well under a millisecond, which fits the engine's per-row decode loop
(``docs/SERVING.md`` says why it was chosen). Only rows that ask for a format pay for it; a row
without one never reaches this module.

``Vocabulary`` wraps the base tokenizer once per engine (about a second, on the first request that
needs it); it also spells tokens as raw bytes for ``logprobs``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import torch

from ..errors import InvalidConfig, InvalidResponseFormat

MAX_SCHEMA_CHARS = 64 << 10
# Compact JSON: with flexible whitespace a weak model can pad with spaces and newlines until its
# token budget runs out, and the output never closes.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class ResponseFormat:
    """The output a row must produce: any JSON object (``json_object``) or JSON valid under ``schema``.

    ``schema`` is the JSON Schema as canonical JSON text (so the value is hashable and immutable).
    """

    type: Literal["json_object", "json_schema"]
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ("json_object", "json_schema"):
            raise InvalidConfig(f"response_format type must be json_object or json_schema, got {self.type!r}")
        if (self.type == "json_schema") != (self.schema is not None):
            raise InvalidConfig("a json_schema response_format needs a schema; json_object takes none")

    @classmethod
    def json_object(cls) -> "ResponseFormat":
        return cls("json_object")

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any] | bool) -> "ResponseFormat":
        """A ``json_schema`` format from a JSON Schema (a mapping, or ``True`` for any JSON value)."""
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidResponseFormat(f"response_format: a JSON schema is an object, got {type(schema).__name__}")
        try:
            text = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidResponseFormat(f"response_format: the JSON schema is not JSON: {exc}") from None
        if len(text) > MAX_SCHEMA_CHARS:
            raise InvalidResponseFormat(
                f"response_format: the JSON schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS} are accepted"
            )
        return cls("json_schema", text)

    def grammar(self) -> str:
        """The llguidance grammar for this format (not yet checked: see ``Vocabulary.matcher``)."""
        from llguidance import LLMatcher

        schema = self.schema if self.schema is not None else '{"type":"object"}'
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidResponseFormat(f"response_format: {exc}") from None


class RowGrammar:
    """One row's grammar state: masks its logits, then follows the token that was chosen."""

    def __init__(self, matcher: Any, vocab_size: int, eos_token_ids: Iterable[int]):
        self._matcher = matcher
        self._eos = np.array(sorted(eos_token_ids), dtype=np.int64)
        self._words = torch.empty(((vocab_size + 31) // 32,), dtype=torch.int32)

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids next to -inf, in place (``[vocab]``)."""
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        # bit j of word w allows token 32 w + j (little-endian); numpy unpacks it ten times faster than torch
        bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[: logits.shape[-1]]
        if not bits.any():  # a matcher in an error state allows nothing: end the row rather than sample NaN
            bits[self._eos[self._eos < bits.size]] = 1
        forbidden = torch.from_numpy(bits == 0)
        logits.masked_fill_(forbidden.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The output is finished: the grammar accepts it and allows nothing more."""
        return self._matcher.is_stopped()


class Vocabulary:
    """The base tokenizer as llguidance sees it: grammars for rows, and every token's raw bytes."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll: Any = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                try:
                    self._ll = llguidance.hf.from_tokenizer(
                        self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
                    )
                except ValueError as exc:  # a slow (Python) tokenizer
                    raise InvalidConfig(
                        f"this base's tokenizer cannot drive constrained decoding or logprobs: {exc}"
                    ) from None
            return self._ll

    def matcher(self, fmt: ResponseFormat) -> RowGrammar:
        """A fresh grammar state for one row; ``InvalidConfig`` names what is wrong with the schema."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._ll_tokenizer(), fmt.grammar(), log_level=0)
        if matcher.is_error():
            raise InvalidResponseFormat(f"response_format: the JSON schema is not supported: {matcher.get_error()}")
        return RowGrammar(matcher, self.vocab_size, self._eos)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token is spelled as its name)."""
        return self._ll_tokenizer().decode_bytes([int(token_id)])
