"""Batching of tokenized examples: length-grouped, seeded order, right-padded tensors.

Batches are right-padded to their own longest row. Rows are length-grouped inside "mega-batches"
of :data:`GROUP_BATCHES` batches (as ``transformers``' ``LengthGroupedSampler`` does), batch order
is shuffled by the seed, and the batch holding the longest row comes first so an out-of-memory
shows up on the first step, not the last.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidConfig
from .tokenize import IGNORE_INDEX, Example, TokenizedSet

if TYPE_CHECKING:  # torch loads when the first batch is collated
    import torch

__all__ = ["GROUP_BATCHES", "Batch", "iter_batches", "batch_indices", "collate"]

GROUP_BATCHES = 50


@dataclass(frozen=True, eq=False)
class Batch:
    """Right-padded tensors of shape ``(rows, longest row)``; ``labels`` is -100 on padding.

    ``num_tokens`` counts real (non-padding) tokens; ``num_target_tokens`` counts those with a loss.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_tokens: int
    num_target_tokens: int

    def to(self, device: Any) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.num_tokens,
            self.num_target_tokens,
        )


def _batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool, group_by_length: bool
) -> list[list[int]]:
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        group = batch_size * GROUP_BATCHES
        order = [
            i for k in range(0, len(order), group) for i in sorted(order[k : k + group], key=lambda i: -lengths[i])
        ]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
        if group_by_length and batches:
            longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
    return batches


def iter_batches(
    examples: Sequence[Example] | TokenizedSet,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    pad_token_id: int,
    group_by_length: bool = True,
) -> Iterator[Batch]:
    """Yield every example exactly once, in batches padded only to each batch's longest row.

    The same examples, batch size and seed give the same batches. ``shuffle=False`` is
    deterministic without randomness (length-grouped unless ``group_by_length=False``, which keeps
    the given order).

    >>> for batch in iter_batches(ts, 8, seed=0, pad_token_id=tok.pad_token_id):  # doctest: +SKIP
    ...     loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
    ...                  labels=batch.labels).loss
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfig(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(pad_token_id, int):
        raise InvalidConfig(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
    rows = list(examples.examples if isinstance(examples, TokenizedSet) else examples)
    for indices in batch_indices(rows, batch_size, seed=seed, shuffle=shuffle, group_by_length=group_by_length):
        yield collate([rows[i] for i in indices], pad_token_id)


def batch_indices(
    examples: Sequence[Example], batch_size: int, *, seed: int = 0, shuffle: bool = True, group_by_length: bool = True
) -> list[list[int]]:
    """The row indices of each batch :func:`iter_batches` would yield, for callers that add rows
    of their own (the trainer mixes replayed examples into each batch) before :func:`collate`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfig(f"batch_size must be a positive integer, got {batch_size!r}")
    return _batch_order([len(e) for e in examples], batch_size, seed, shuffle, group_by_length)


def collate(rows: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad ``rows`` to the longest of them into one :class:`Batch`."""
    from ..base import pad_rows

    input_ids, attention_mask = pad_rows([e.input_ids for e in rows], pad_token_id)
    labels, _ = pad_rows([e.labels for e in rows], IGNORE_INDEX)
    return Batch(input_ids, attention_mask, labels, num_tokens=sum(len(e) for e in rows),
                 num_target_tokens=int((labels != IGNORE_INDEX).sum()))


