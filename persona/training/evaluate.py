"""Evaluation: the mean next-token loss of adapter weights on tokenized examples, and of stored versions.

The trainer measures a parent and its update with :meth:`Evaluator.loss` (the gate's inputs);
``persona eval`` reports loss and perplexity of versions with :func:`evaluate_versions`. A layered
adapter is always judged over its pinned layer, as it is trained and served.

>>> evaluator = Evaluator(base.model, LoraRuntime.attach(base.model), pad_id=0)   # doctest: +SKIP
>>> evaluator.loss(tokenized.examples, weights)                                     # doctest: +SKIP
(1.93, 412)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..lora_runtime import Activation, AdapterWeights, LoraRuntime
from ..refs import AdapterRef
from ..store.facade import Store, VersionInfo
from .batches import Batch, batch_indices, collate
from .tokenize import IGNORE_INDEX, Example, TokenizedSet

__all__ = ["EVAL_BATCH_ROWS", "EvalResult", "Evaluator", "evaluate_versions", "layers_below", "loss_per_row", "loss_sum",
           "loss_sums"]

EVAL_BATCH_ROWS = 32
"""Rows per forward when the gate scores a version (:meth:`Evaluator.losses`): no backward, so no activations are kept
and a larger batch only means fewer passes of the base (issue 15: the held-out slice and the replay sample of a
12-row update are one forward, not five)."""

# Architectures whose logits are exactly lm_head(last hidden state): no softcapping or scaling.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"}


@dataclass(frozen=True)
class EvalResult:
    """Loss per target token and perplexity of one version (or ``"base"``) on a set of examples."""

    adapter: str
    version: str  # "v0003" or "base"
    loss: float
    perplexity: float
    tokens: int
    examples: int
    over: str | None = None  # the pinned layer evaluated beneath a layered adapter ("domain:finance@v1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over labelled positions, and their count.

    For plain-head architectures the vocabulary projection is applied only at labelled positions
    (on chat data most positions are prompt), which saves a large share of each step.
    """
    losses, rows = _target_losses(model, batch)
    return losses.sum(), int(rows.numel())


def loss_sums(model: torch.nn.Module, batch: Batch, blocks: Sequence[tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
    """:func:`loss_sum` of each block of rows ``(start, stop)`` of ``batch`` (contiguous, in order), from one
    forward: a multi-adapter training step's loss per adapter, each differentiable only through its rows."""
    losses, rows = _target_losses(model, batch)
    per_row = torch.bincount(rows, minlength=batch.input_ids.size(0)).cumsum(0).tolist()
    ends = [0] + per_row  # labelled positions come row by row, so a block's positions are one slice
    return [(losses[ends[start]:ends[stop]].sum(), ends[stop] - ends[start]) for start, stop in blocks]


def loss_per_row(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and labelled-token count of each row of ``batch`` (float64 and int64, on
    the CPU): one pass scores rows of several data sets at once (:mod:`.matrix`)."""
    losses, rows = _target_losses(model, batch)
    n = batch.input_ids.size(0)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, rows.cpu(), losses.detach().double().cpu())
    counts = torch.zeros(n, dtype=torch.int64).index_add_(0, rows.cpu(), torch.ones_like(rows.cpu()))
    return sums, counts


def _target_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss at every labelled position (float32) and the row each position belongs to."""
    batch = batch.to(next(model.parameters()).device)  # batches are built on the CPU; the model may be on a GPU
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    if getattr(model.config, "model_type", None) in _PLAIN_HEAD:
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][mask].float()
    return torch.nn.functional.cross_entropy(logits, labels[mask], reduction="none"), rows


class Evaluator:
    """Measures losses on one frozen model whose LoRA layers ``runtime`` controls."""

    def __init__(self, model: torch.nn.Module, runtime: LoraRuntime, pad_id: int):
        self.model = model
        self.runtime = runtime
        self.pad_id = pad_id

    def loss(self, examples: Sequence[Example], weights: AdapterWeights | None, batch_size: int = 8,
             below: Sequence[AdapterWeights] = ()) -> tuple[float, int]:
        """Mean loss per target token (and the token count) of ``weights`` (None: the base alone),
        on top of the frozen layers ``below`` (a layered adapter's domain adapter); NaN without examples."""
        return self.losses([examples], weights, batch_size, below)[0]

    def losses(self, sets: Sequence[Sequence[Example]], weights: AdapterWeights | None,
               batch_size: int = EVAL_BATCH_ROWS, below: Sequence[AdapterWeights] = ()) -> list[tuple[float, int]]:
        """:meth:`loss` of each of ``sets``, all scored in one batched pass (issue 15).

        The rows of every set go through the base together, length-grouped so a batch pads little, under
        ``torch.inference_mode``; each row's summed loss and target-token count (:func:`loss_per_row`) is
        added to its own set, so a set's loss does not depend on what shared its batches (to float rounding).
        NaN (and 0 tokens) for an empty set.

        >>> (held, n), (replay, m) = evaluator.losses([held_rows, replay_rows], weights)   # doctest: +SKIP
        """
        owner = [k for k, rows in enumerate(sets) for _ in rows]
        rows = [row for s in sets for row in s]
        sums, counts = [0.0] * len(sets), [0] * len(sets)
        if rows:
            self._score(rows, owner, weights, batch_size, below, sums, counts)
        return [(sums[k] / max(counts[k], 1), counts[k]) if len(s) else (float("nan"), 0) for k, s in enumerate(sets)]

    def _score(self, rows: list[Example], owner: list[int], weights: AdapterWeights | None, batch_size: int,
               below: Sequence[AdapterWeights], sums: list[float], counts: list[int]) -> None:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device  # stored weights load on the CPU, in float32
        stack = [Activation(w.to(device)) for w in below] + ([Activation(weights.to(device))] if weights is not None else [])
        try:
            with torch.inference_mode(), self.runtime.activate(stack):
                for indices in batch_indices(rows, batch_size, shuffle=False):
                    row_sums, row_counts = loss_per_row(self.model, collate([rows[i] for i in indices], self.pad_id))
                    for i, total, n in zip(indices, row_sums.tolist(), row_counts.tolist()):
                        sums[owner[i]] += total
                        counts[owner[i]] += n
        finally:
            self.model.train(was_training)


def layers_below(store: Store, info: VersionInfo) -> list[AdapterWeights]:
    """The pinned adapter a layered adapter sits on (empty for a plain one), frozen: no dropout."""
    if info.over_ref is None:
        return []
    loaded = store.load(info.over_ref)
    weights = AdapterWeights.from_peft(loaded.tensors, loaded.config)
    return [AdapterWeights(weights.factors, weights.scale, 0.0)]  # frozen layers get no dropout


def evaluate_versions(store: Store, evaluator: Evaluator, ref: AdapterRef, data: TokenizedSet,
                      versions: Sequence[str] | None = None) -> list[EvalResult]:
    """Loss and perplexity of each of ``versions`` of ``ref`` (default: the one ``ref`` names;
    ``"base"``: no adapter) on ``data``; a layered version is evaluated over its pinned layer
    (``EvalResult.over`` names it)."""
    out = []
    for selector in versions or [ref.selector]:
        below: list[AdapterWeights] = []
        over = None
        if selector == "base":
            weights, label = None, "base"
        else:
            pinned = store.resolve(AdapterRef.parse(f"{ref.id}@{selector}"))
            loaded = store.load(pinned)
            weights, label = AdapterWeights.from_peft(loaded.tensors, loaded.config), loaded.info.label
            below = layers_below(store, loaded.info)  # a layered adapter is judged as it is trained and served
            over = str(loaded.info.over_ref) if loaded.info.over_ref is not None else None
        loss, tokens = evaluator.loss(data.examples, weights, below=below)
        out.append(EvalResult(ref.id, label, loss, math.exp(min(loss, 50)), tokens, len(data), over))
    return out
