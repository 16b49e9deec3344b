"""One decode step, row by row: shape each row's logits, choose its token, record its logprobs.

The engine's loop runs the forward passes (KV cache, routes, rows leaving the batch); for every
step it calls :func:`next_tokens` on the last position's logits, then :func:`advance` to hand each
live :class:`Row` its token. A row that asks for none of logprobs, ``logit_bias`` or a grammar
(``response_format``) is not touched beyond sampling.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

from .detokenize import TextStream
from .requests import FinishReason, GenerationResult, Job, cancelled_error
from .sampling import TokenLogprob, choose_tokens, make_generator, token_logprobs

__all__ = ["Row", "advance", "new_kv_cache", "next_tokens", "positions"]


class Row:
    """One live row of a decode loop: its text, its budget, and where its output goes.

    ``tokenizer_lock`` guards the shared tokenizer (fast tokenizers are not safe across threads).
    """

    def __init__(
        self,
        job: Job,
        *,
        tokenizer: Any,
        tokenizer_lock: threading.Lock,
        device: torch.device,
        eos_token_ids: frozenset[int],
    ):
        self.job = job
        self.params = job.request.params
        self.text = TextStream(tokenizer, job.prompt_ids, job.request.params.stop)
        self.generator = make_generator(self.params, device)
        self.eos = eos_token_ids
        self.tokens = 0
        self.done = False
        self._tokenizer_lock = tokenizer_lock
        self.grammar = job.grammar
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self._unsent = 0  # logprobs entries not yet handed out with a text delta
        self.shapes_logits = self.params.shapes_logits
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.params.logit_bias:
            ids, values = zip(*self.params.logit_bias, strict=True)
            self.bias = (torch.tensor(ids, device=device), torch.tensor(values, device=device))

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take the chosen token (with its logprobs entry when the row records them)."""
        self.tokens += 1
        if token in self.eos:
            return self._finish("stop")
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if self.grammar is not None:
            self.grammar.advance(token)
        with self._tokenizer_lock:
            delta = self.text.add(token)
        if delta:
            self._emit(delta)
        if self.text.stopped:
            self._finish("stop")
        elif self.grammar is not None and self.grammar.complete:  # the JSON is closed: nothing may follow
            self._finish("stop")
        elif self.tokens >= self.job.max_new_tokens:
            self._finish("length")

    def _emit(self, text: str) -> None:
        if self.logprobs is None:
            return self.job.handle.emit(text)
        self.job.handle.emit(text, tuple(self.logprobs[self._unsent :]))
        self._unsent = len(self.logprobs)

    def _finish(self, reason: FinishReason) -> None:
        with self._tokenizer_lock:
            rest = self.text.finish()
        if rest or (self.logprobs is not None and self._unsent < len(self.logprobs)):
            self._emit(rest)
        self.done = True
        self.job.handle.finish(
            GenerationResult(
                text=self.text.text,
                finish_reason=reason,
                prompt_tokens=len(self.job.prompt_ids),
                completion_tokens=self.tokens,
                model=self.job.request.model,
                resolved=tuple(str(p) for p in self.job.parts),
                logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            )
        )


def next_tokens(
    logits: torch.Tensor, rows: Sequence[Row], token_bytes: Callable[[int], bytes]
) -> tuple[torch.Tensor, dict[int, TokenLogprob]]:
    """Each row's next token from its last-position ``logits`` (shaped in place), and the logprobs
    entries of the rows that record them (by row index). ``token_bytes`` spells a token id."""
    recorded, raw = _shape_logits(logits, rows)
    tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
    return tokens, _logprobs(recorded, raw, tokens, rows, token_bytes)


def advance(rows: Sequence[Row], tokens: torch.Tensor, entries: dict[int, TokenLogprob]) -> None:
    """Hand every row its token; a row whose request was cancelled ends instead (failed)."""
    for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=False)):
        if row.job.handle.cancelled:
            row.done = True
            row.job.handle.fail(cancelled_error())
        else:
            row.push(token, entries.get(i))


def _shape_logits(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[list[int], torch.Tensor | None]:
    """Per-row logit work, paid only by rows that ask for it (others are not touched).

    Copies the raw logits of the rows that record logprobs (before anything shapes the choice: the
    log-probabilities OpenAI reports), then adds ``logit_bias`` and applies the grammar mask in place.
    Returns those rows' indices and their raw logits.
    """
    recorded = [i for i, row in enumerate(rows) if row.logprobs is not None]
    raw = logits[recorded].float() if recorded else None  # indexing with a list copies
    for i, row in enumerate(rows):
        if row.shapes_logits:
            if row.bias is not None:
                ids, values = row.bias
                logits[i, ids] += values.to(logits.dtype)
            if row.grammar is not None:
                row.grammar.mask_(logits[i])
    return recorded, raw


def _logprobs(
    recorded: list[int],
    raw: torch.Tensor | None,
    tokens: torch.Tensor,
    rows: Sequence[Row],
    token_bytes: Callable[[int], bytes],
) -> dict[int, TokenLogprob]:
    """The logprobs entries of the rows that record them, for this step's chosen tokens."""
    if not recorded:
        return {}
    chosen = tokens[recorded].tolist()
    top = [rows[i].params.logprobs or 0 for i in recorded]
    entries = token_logprobs(raw, chosen, top, token_bytes)
    return dict(zip(recorded, entries, strict=True))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: 0.. over real tokens; padding gets 0 (it is masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def new_kv_cache(model):
    """An empty KV cache for ``model``'s decode loop."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # sliding-window and hybrid layers follow the config
    except TypeError:  # older transformers: a plain dynamic cache
        return DynamicCache()
