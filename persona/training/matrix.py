"""The continual-learning loss matrix of one adapter: every version on every update's kept held-out slice.

The field measures continual learning with a matrix R[i][j] = quality of the model after step i on
task j's held-out data, and summarizes it as backward and forward transfer (GEM, Lopez-Paz & Ranzato
2017). Here a "task" is an update: its held-out slice, kept with the version it published
(``Store.heldout``), and quality is the mean next-token loss per target token, so lower is better.

- Rows: row 0 is the base alone, then each version of the adapter, oldest first, up to the *final*
  version F (the one the reference names: ``current`` by default).
- Columns: the versions up to F that kept a slice, oldest first. Column j belongs to version k_j.
  Versions written before slices were kept (and versions no update made) are listed as not kept.
- ``gain[j] = R[base][j] - R[k_j][j]``: how much update j beat the base on its own slice.
- ``BWT = mean over j with k_j < F of (R[k_j][j] - R[F][j])``: the loss on each earlier update's
  slice when that update was made, minus the final version's. Negative means the final version is
  worse there than when it learned it: forgetting. (GEM's definition, with the sign flipped because
  loss falls where accuracy rises.) None with no earlier column.
- ``FWT = mean over columns j after the first, whose version has a parent p, of (R[base][j] - R[p][j])``:
  how much the version update j started from (its parent) already beat the base on that update's
  slice before training on it (GEM skips the first task too). None with no such column.

Fast path: each slice is tokenized once; each version then scores all slices in one batched pass
(:func:`~persona.training.evaluate.loss_per_row` gives each row its own loss), with the base loaded once.
A layered version is scored over its pinned layer, as it is trained and served.

>>> matrix = loss_matrix(store, evaluator, tokenizer, parse_ref("user:alice"))   # doctest: +SKIP
>>> matrix.bwt, matrix.fwt                                                      # doctest: +SKIP
(-0.021, 0.004)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..lora_runtime import Activation, AdapterWeights
from ..refs import AdapterRef
from ..store import Store, VersionInfo
from .batches import batch_indices, collate
from .evaluate import Evaluator, layers_below, loss_per_row
from .tokenize import Example, tokenize_interactions

__all__ = ["LossMatrix", "loss_matrix"]

BASE_ROW = "base"


@dataclass(frozen=True)
class LossMatrix:
    """R of one adapter as of its version ``final``; see the module docstring for every definition.

    ``losses[i][j]`` is row ``rows[i]`` ("base", "v0001", ...) on the slice of ``columns[j]`` (NaN when
    the slice has no target token); ``tokens[j]``/``examples[j]`` size each slice.
    """

    adapter: str
    final: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    losses: tuple[tuple[float, ...], ...]
    tokens: tuple[int, ...]
    examples: tuple[int, ...]
    not_kept: tuple[str, ...]
    gain: tuple[float, ...]
    bwt: float | None
    fwt: float | None

    def loss(self, row: str, column: str) -> float:
        """R[row][column] by labels: ``matrix.loss("v0003", "v0002")``."""
        return self.losses[self.rows.index(row)][self.columns.index(column)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null): what ``persona eval REF --matrix --json`` prints."""
        return {
            "adapter": self.adapter,
            "final": self.final,
            "rows": list(self.rows),
            "columns": list(self.columns),
            "losses": [[_num(v) for v in row] for row in self.losses],
            "tokens": list(self.tokens),
            "examples": list(self.examples),
            "not_kept": list(self.not_kept),
            "gain": [_num(v) for v in self.gain],
            "bwt": _num(self.bwt),
            "fwt": _num(self.fwt),
        }


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(rows: Sequence[str], columns: Sequence[str], losses: Sequence[Sequence[float]],
              parents: dict[str, str | None], final: str) -> tuple[tuple[float, ...], float | None, float | None]:
    """``(gain per column, BWT, FWT)`` of a loss matrix (module docstring); ``parents`` maps a column's
    version label to its parent's label (None: no parent row)."""
    R = {row: dict(zip(columns, values)) for row, values in zip(rows, losses)}
    gain = tuple(R[BASE_ROW][c] - R[c][c] for c in columns)
    earlier = set(rows[:rows.index(final)])
    bwt = _mean([R[c][c] - R[final][c] for c in columns if c in earlier])
    fwt = _mean([R[BASE_ROW][c] - R[p][c] for c in columns[1:] if (p := parents.get(c)) is not None and p in R])
    return gain, bwt, fwt


def loss_matrix(store: Store, evaluator: Evaluator, tokenizer: Any, ref: AdapterRef, *, max_length: int = 512,
                batch_size: int = 8) -> LossMatrix:
    """Score the base and every version of ``ref`` up to the one it names on every kept held-out slice."""
    final = store.version_info(ref)
    versions = [v for v in store.versions(ref) if v.version <= final.version]
    kept, not_kept = [], []
    slices: list[list[Example]] = []
    for info in versions:
        interactions = store.heldout(info.ref) if info.heldout_kept else None
        if interactions is None:
            not_kept.append(info.label)
            continue
        kept.append(info)
        slices.append(list(tokenize_interactions(interactions, tokenizer, max_length=max_length).examples))
    pooled = [e for examples in slices for e in examples]
    owner = torch.tensor([j for j, examples in enumerate(slices) for _ in examples], dtype=torch.int64)
    rows = [BASE_ROW] + [v.label for v in versions]
    losses, tokens = [], [0] * len(kept)
    for info in [None, *versions]:
        sums, counts = _score(store, evaluator, info, pooled, owner, len(kept), batch_size)
        losses.append(tuple(float(s / c) if c else math.nan for s, c in zip(sums.tolist(), counts.tolist())))
        tokens = [int(c) for c in counts.tolist()]
    columns = tuple(v.label for v in kept)
    labels = {v.version: v.label for v in versions}
    parents = {v.label: labels.get(v.parent) if v.parent is not None else None for v in kept}
    gain, bwt, fwt = summarize(rows, columns, losses, parents, final.label)
    return LossMatrix(ref.id, final.label, tuple(rows), columns, tuple(losses), tuple(tokens),
                      tuple(len(s) for s in slices), tuple(not_kept), gain, bwt, fwt)


@torch.no_grad()
def _score(store: Store, evaluator: Evaluator, info: VersionInfo | None, pooled: list[Example], owner: torch.Tensor,
           columns: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and target tokens per column of one row (``info`` None: the base), in one pass."""
    sums, counts = torch.zeros(columns, dtype=torch.float64), torch.zeros(columns, dtype=torch.int64)
    if not pooled:
        return sums, counts
    stack: list[AdapterWeights] = []
    device = next(evaluator.model.parameters()).device
    if info is not None:
        loaded = store.load(info.ref)
        stack = [*layers_below(store, info), AdapterWeights.from_peft(loaded.tensors, loaded.config)]
    was_training = evaluator.model.training
    evaluator.model.eval()
    try:
        with evaluator.runtime.activate([Activation(w.to(device)) for w in stack]):
            for indices in batch_indices(pooled, batch_size, shuffle=False):
                row_sums, row_counts = loss_per_row(evaluator.model, collate([pooled[i] for i in indices],
                                                                             evaluator.pad_id))
                where = owner[indices]
                sums.index_add_(0, where, row_sums)
                counts.index_add_(0, where, row_counts)
    finally:
        evaluator.model.train(was_training)
    return sums, counts
