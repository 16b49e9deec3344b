"""The running batch of continuous batching: rows that join and leave a shared KV cache at any step.

``RunningBatch`` holds the rows being decoded, with one left-padded dense KV cache (a transformers
``DynamicCache``: per layer, keys and values ``[rows, heads, length, head_dim]``), the attention mask
``[rows, length]``, each row's next position id and the token it feeds next. Each iteration of the
engine's worker calls one of:

- ``prefill(rows)`` runs the new rows' prompts in a forward of their own (left padded among
  themselves, a fresh cache), chooses their first tokens (handed to their streams before anything
  else runs), and merges the rows that go on into the running cache: the shorter of the two caches
  is padded on the left (zero keys and values under a zero mask), then the two are concatenated
  along the batch; a prompt longer than the step's token budget becomes ``partial`` instead;
- ``prefill_chunk(chunk)`` runs the next ``chunk`` tokens of the ``partial`` row's prompt (chunked
  prefill); after the last one the row gets its first token and joins;
- ``decode()`` feeds every running row its pending token in one forward, chooses the next ones,
  and drops the rows that finished (``index_select`` along the batch); columns that no remaining
  row attends to any more are cut from the left, so the cache is as long as its longest live row.

Why a dense cache and not a paged one (vLLM's PagedAttention): transformers' attention reads one
contiguous tensor per layer, and a masked key contributes exactly zero to a softmax, so padding and
re-packing change no row's result (checked against each adapter alone, and against the same
requests run one at a time). The cost is the copy when rows join (the whole cache once per join). It is kept: every
decode step copies the whole cache anyway (``DynamicLayer.update`` appends with ``torch.cat``), so
a join costs about one step's append, after the joiners' first tokens are out; growing in place
would mean replacing transformers' cache class for no visible gain (``record("join_s", ...)``
measures it). Pages would pay off with many long contexts on a GPU, where memory, not copying, is
the limit.

Position ids are per row (``decode.positions``), so a row's positions do not depend on how much
padding the batch gives it. Nothing here chooses which rows join: that is ``scheduler``'s admission.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from ..base import pad_rows
from ..errors import InvalidConfig
from .decode import Row, positions

__all__ = ["RunningBatch", "TurnLock", "check_cache_layers"]

Forward = Callable[..., torch.Tensor]  # (ids, mask, position_ids, cache) -> last-position logits
Choose = Callable[[torch.Tensor, Sequence[Row]], torch.Tensor]  # shape, choose, hand every row its token; the tokens
Routes = Mapping[str, Any]


class RunningBatch:
    """Rows being decoded together, with their KV cache; rows join (``prefill``) and leave at any step.

    ``forward`` runs the model on ``(ids, mask, position_ids, cache)`` and returns last-position
    logits; ``routes_for(rows, decoding)`` builds the LoRA routes of these rows and ``apply_routes``
    sets them on the model; ``choose`` picks each row's token from the logits and hands it over
    (``decode.next_tokens`` + ``decode.advance``), returning the tokens; ``new_cache`` makes an empty KV cache.
    """

    def __init__(
        self,
        *,
        forward: Forward,
        routes_for: Callable[[Sequence[Row], bool], Routes],
        apply_routes: Callable[[Routes], None],
        choose: Choose,
        new_cache: Callable[[], Any],
        pad_token_id: int,
        device: torch.device,
        record: Callable[[str, float], None] | None = None,
    ):
        self._forward = forward
        self._record = record or (lambda phase, seconds: None)
        self._routes_for = routes_for
        self._apply_routes = apply_routes
        self._choose = choose
        self._new_cache = new_cache
        self._pad = pad_token_id
        self._device = device
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, length]: 1 over each row's real tokens
        self._next_pos: torch.Tensor | None = None  # [rows, 1]: each row's next position id
        self._pending: torch.Tensor | None = None  # [rows]: the token each row feeds at the next step
        self._routes: Routes | None = None  # the running rows' routes; None after rows joined or left
        self.partial: _Partial | None = None  # a long prompt being prefilled in chunks (not yet running)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """Columns of the cache (the longest live row's tokens so far, padding included)."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def prefill(self, rows: Sequence[Row], chunk: int | None = None) -> list[Row]:
        """Run the new rows' prompts, hand each its first token, and let those that go on join.

        With ``chunk``, one row (admission lets a longer prompt join alone) whose prompt is longer than
        ``chunk`` tokens is not run at once: it becomes ``partial`` and its first ``chunk`` tokens run
        now, the rest by ``prefill_chunk`` (one prompt at a time is chunked).
        Returns the rows that ended at their first token (their handles are finished or failed).
        """
        rows = list(rows)
        if not rows:
            return []
        if chunk is not None and self.partial is None and len(rows) == 1 and len(rows[0].job.prompt_ids) > chunk:
            self.partial = _Partial(rows[0], self._new_cache())
            return self.prefill_chunk(chunk)
        ids, mask = pad_rows([r.job.prompt_ids for r in rows], self._pad, side="left")
        ids, mask = ids.to(self._device), mask.to(self._device)
        position_ids = positions(mask)
        self._apply_routes(self._routes_for(rows, False))  # one forward: gathered at that forward, no pre-gather
        cache = self._new_cache()
        start = time.perf_counter()
        logits = self._forward(ids, mask, position_ids, cache)
        end = time.perf_counter()
        tokens = self._choose(logits, rows)  # the first tokens reach their streams here, before any decode step
        chosen = time.perf_counter()
        for row in rows:
            row.job.times.prefill_start, row.job.times.prefill_end, row.job.times.first_token = start, end, chosen
        keep = [i for i, r in enumerate(rows) if not r.done]
        ended = [r for r in rows if r.done]
        if keep:
            index = torch.tensor(keep, device=self._device)
            if len(keep) < len(rows):
                cache.batch_select_indices(index)
            self._join([rows[i] for i in keep], cache, mask[index], position_ids[index, -1:] + 1, tokens[index])
            self._record("join_s", time.perf_counter() - chosen)
        return ended

    def prefill_chunk(self, chunk: int) -> list[Row]:
        """Run the next ``chunk`` prompt tokens of the ``partial`` row through its own cache; after its
        last chunk, hand it its first token and let it join (returned if it ended at that token).

        Chunked prefill (Sarathi-Serve; vLLM's ``--enable-chunked-prefill``): a prompt longer than the
        step's token budget runs a budget's worth per iteration, and the running rows decode between
        its chunks instead of stalling for its whole prefill. Exact: the chunk's queries attend to
        the cached keys of the chunks before it, at the positions they would have had in one pass.
        """
        part = self.partial
        assert part is not None
        prompt = part.row.job.prompt_ids
        start, end = part.done, min(part.done + chunk, len(prompt))
        ids = torch.tensor([prompt[start:end]], device=self._device)
        mask = torch.ones((1, end), dtype=torch.long, device=self._device)
        position_ids = torch.arange(start, end, device=self._device).view(1, -1)
        self._apply_routes(self._routes_for([part.row], False))
        began = time.perf_counter()
        logits = self._forward(ids, mask, position_ids, part.cache)
        finished = time.perf_counter()
        times = part.row.job.times
        times.prefill_start = times.prefill_start or began
        part.done = end
        if end < len(prompt):
            return []
        self.partial = None
        tokens = self._choose(logits, [part.row])
        times.prefill_end, times.first_token = finished, time.perf_counter()
        if part.row.done:
            return [part.row]
        self._join([part.row], part.cache, mask, position_ids[:, -1:] + 1, tokens)
        self._record("join_s", time.perf_counter() - times.first_token)
        return []

    def decode(self) -> list[Row]:
        """One step for every running row; returns the rows that ended (they have left the batch)."""
        if not self.rows:
            return []
        assert self._mask is not None and self._next_pos is not None and self._pending is not None
        if self._routes is None:  # the rows changed: gather their factors once for the steps to come
            start = time.perf_counter()
            self._routes = self._routes_for(self.rows, True)
            self._record("routes_s", time.perf_counter() - start)
        self._apply_routes(self._routes)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(self._pending.view(-1, 1), self._mask, self._next_pos, self._cache)
        self._next_pos = self._next_pos + 1
        self._pending = self._choose(logits, self.rows)
        return self._drop_finished()

    def clear(self) -> list[Row]:
        """Empty the batch (after a failed forward); returns the rows it held, a partial one included."""
        rows, self.rows = self.rows, []
        if self.partial is not None:
            rows.append(self.partial.row)
        self._cache = self._mask = self._next_pos = self._pending = self._routes = self.partial = None
        return rows

    def drop_partial(self) -> Row | None:
        """Forget the row being prefilled in chunks (its request was cancelled); returns it."""
        part, self.partial = self.partial, None
        return None if part is None else part.row

    # ------------------------------------------------------------------ cache surgery
    def _join(self, rows: list[Row], cache: Any, mask: torch.Tensor, next_pos: torch.Tensor,
              tokens: torch.Tensor) -> None:
        """Merge prefilled rows into the running cache: the shorter side is padded on the left."""
        if not self.rows:
            self.rows, self._cache, self._mask, self._next_pos, self._pending = rows, cache, mask, next_pos, tokens
            self._routes = None
            return
        check_cache_layers(cache)
        assert self._mask is not None and self._next_pos is not None and self._pending is not None
        width = max(self._mask.shape[1], mask.shape[1])
        old_pad, new_pad = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys, new_pad)], dim=0)
            old.values = torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values, new_pad)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, old_pad), _pad_left(mask, new_pad)], dim=0)
        self._next_pos = torch.cat([self._next_pos, next_pos], dim=0)
        self._pending = torch.cat([self._pending, tokens], dim=0)
        self.rows = self.rows + rows
        self._routes = None

    def _drop_finished(self) -> list[Row]:
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        ended = [r for r in self.rows if r.done]
        if not ended:
            return []
        if not keep:  # the batch empties (a partial row, if any, stays)
            self.rows = []
            self._cache = self._mask = self._next_pos = self._pending = self._routes = None
            return ended
        assert self._mask is not None and self._next_pos is not None and self._pending is not None
        index = torch.tensor(keep, device=self._device)
        self._mask = self._mask.index_select(0, index)
        # Columns only the finished rows attended to: cut them, so the cache tracks its longest live row.
        start = int(self._mask.any(dim=0).long().argmax())
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self._mask = self._mask[:, start:]
        self._next_pos = self._next_pos.index_select(0, index)
        self._pending = self._pending.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self._routes = None
        return ended


class _Partial:
    """A row whose long prompt is being prefilled in chunks: its own cache and how far it has got."""

    def __init__(self, row: Row, cache: Any):
        self.row, self.cache, self.done = row, cache, 0


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with ``n`` zero columns in front of its sequence axis (dim 2 of a cache, dim 1 of a mask)."""
    if n == 0:
        return t
    axis = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[axis] = n
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def check_cache_layers(cache: Any) -> None:
    """Refuse a cache whose layers the surgery above would get wrong (sliding windows keep a rolling
    tail, not one column per token; quantized or offloaded layers hold other tensors)."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer:
            raise InvalidConfig(
                f"the engine needs plain dynamic KV cache layers (rows join and leave its cache at any "
                f"step); this model's cache has {type(layer).__name__}, which it cannot serve"
            )


class TurnLock:
    """The engine's model lock: re-entrant, and a thread that takes it in a loop lets waiters in.

    Continuous batching takes the lock for one step at a time; between steps, the router
    (``domain:auto`` admission), ``logits`` or ``generate`` from other threads may run. A plain
    lock released and at once re-taken by the same thread is rarely won by a waiter, so the worker
    calls ``yield_to_waiting`` before each step.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._waiting = 0
        self._count = threading.Lock()

    def __enter__(self) -> "TurnLock":
        if not self._lock.acquire(blocking=False):
            with self._count:
                self._waiting += 1
            try:
                self._lock.acquire()
            finally:
                with self._count:
                    self._waiting -= 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def yield_to_waiting(self, limit_s: float = 0.05) -> None:
        """Pause (up to ``limit_s``) while other threads wait for the lock, so one of them takes it first."""
        deadline = time.monotonic() + limit_s
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0005)
