"""The optimization loop of an update: AdamW on LoRA factors, with rehearsal and a pull.

Each step takes a batch of new rows (length-grouped, seeded), adds replayed rows on top (rehearsal
must not slow how fast the new data is learned: fewer new rows per step would mean more steps for
the same epochs), and minimizes the mean next-token loss plus the :class:`~.regularize.Pull`.
Only the forward/backward may run in bf16 autocast (:func:`training_precision`); the factors and
the optimizer state stay fp32.

One adapter's training is a :class:`Lane`: its factors, its own AdamW, seeded batch order, replay
sampler and dropout stream. :func:`train_step` runs one optimizer step of one or several lanes over
one forward/backward of the frozen base (issue 15): each lane's rows are a contiguous block of the
batch computing its own LoRA update (:class:`~persona.lora_runtime.RowBlock`), its loss is the mean
over its own target tokens, and only lanes with a loss in the step step their optimizer. A lane's
gradient comes from its rows alone, so it trains as it would alone (tests/test_update_many.py).
A single update is one lane stepped by itself (:func:`optimize`).
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import NonFiniteWeights
from ..lora_runtime import Activation, AdapterWeights, LoraRuntime, RowBlock
from .batches import batch_indices, collate
from .evaluate import loss_sums
from .regularize import Pull
from .supersede import sample_replay
from .tokenize import Example, TokenizedSet

if TYPE_CHECKING:
    from .config import UpdateConfig

__all__ = ["Lane", "optimize", "train_step", "training_precision"]


def training_precision(requested: str, model: torch.nn.Module) -> str:
    """``fp32`` or ``bf16``: what ``requested`` means on the device holding ``model``.

    ``auto`` picks bf16 autocast where matrix products in bf16 are native and faster: CUDA devices
    that support bf16, CPUs with AVX512-BF16 or AMX (measured on this project's 2-core AVX512-BF16
    machine: a training step 1.4x faster, benchmarks/train_step.py; a whole update 1.28x,
    benchmarks/update_sweep.py). Elsewhere bf16 would be emulated and slower, so
    ``auto`` is fp32. Only the training forward/backward runs in bf16: the LoRA factors, the
    optimizer state, evaluation, the gate and serving stay fp32.
    """
    if requested != "auto":
        return requested
    device = next(model.parameters()).device
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        native = [getattr(torch.cpu, probe, lambda: False) for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bf16" if any(check() for check in native) else "fp32"
    return "fp32"


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Lane:
    """One adapter's training: its trainable factors (updated in place), optimizer, pull and schedule.

    The schedule is the batches alone training would take, in the same order: ``config.epochs``
    passes of length-grouped batches of ``config.batch_size`` new rows (seed ``config.seed + epoch``)
    with replayed rows on top (its own seeded sampler), cut at ``config.max_steps``. Dropout draws
    from the lane's own generator, seeded like torch's global one is for a single update.
    """

    def __init__(self, weights: AdapterWeights, below: Sequence[AdapterWeights], pull: Pull, train_set: TokenizedSet,
                 replay_examples: Sequence[Example], config: UpdateConfig, device: torch.device):
        self.weights = weights
        self.below = [w.to(device) for w in below]
        self.pull = pull
        self.config = config
        self.flat = [p for pair in weights.factors.values() for p in pair]
        self.optimizer = torch.optim.AdamW(self.flat, lr=config.learning_rate, weight_decay=0.0)
        self.generator = torch.Generator(device).manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        per_epoch = math.ceil(len(train_set) / config.batch_size)
        self.total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
        self.losses: list[float] = []
        self.steps = 0
        self.error: str | None = None  # why the lane stopped early (a non-finite loss or gradient)
        self._batches = self._schedule(train_set, list(replay_examples))
        self._next: list[Example] | None = None

    def _schedule(self, train_set: TokenizedSet, replay: list[Example]) -> Iterator[list[Example]]:
        n_replay = round(self.config.batch_size * self.config.replay_fraction) if replay else 0
        given = 0
        for epoch in range(self.config.epochs):
            for indices in batch_indices(train_set.examples, self.config.batch_size, seed=self.config.seed + epoch):
                if given >= self.total:
                    return
                rows = [train_set.examples[i] for i in indices]
                if n_replay:
                    rows += sample_replay(self.rng, replay, n_replay, self.config.replay_recency)
                given += 1
                yield rows

    def peek(self) -> list[Example] | None:
        """The rows of the lane's next step (None: done)."""
        if self._next is None and self.error is None:
            self._next = next(self._batches, None)
        return self._next

    def take(self) -> list[Example]:
        rows = self.peek()
        if rows is None:
            raise RuntimeError("the lane has no step left")
        self._next = None
        return rows

    @property
    def done(self) -> bool:
        return self.error is not None or self.peek() is None

    def check(self) -> None:
        """:class:`NonFiniteWeights` when the lane stopped on a non-finite loss or gradient."""
        if self.error:
            raise NonFiniteWeights(f"{self.error}; nothing was published: lower the learning rate")


def train_step(model: torch.nn.Module, runtime: LoraRuntime, work: Sequence[tuple[Lane, Sequence[Example]]], *,
               pad_id: int, precision: str = "fp32") -> None:
    """One optimizer step of each lane in ``work`` on its rows, from one forward/backward of ``model``.

    Each lane's loss is its own mean over its target tokens (plus its pull); the objective is their
    sum, so a lane's factors get the gradient of its own loss only. A lane whose rows hold no target
    token gets no optimizer step at all (Adam's moments would move its factors even on a zero
    gradient); a non-finite loss or gradient stops that lane with the reason (``lane.error``), unstepped.
    """
    device = next(model.parameters()).device
    rows = [row for _, lane_rows in work for row in lane_rows]
    bounds, start = [], 0
    for _, lane_rows in work:
        bounds.append((start, start + len(lane_rows)))
        start += len(lane_rows)
    batch = collate(rows, pad_id)
    if len(work) == 1:  # alone: the adapter on every row, the fused path
        lane = work[0][0]
        activations = [Activation(w) for w in lane.below] + [Activation(lane.weights, generator=lane.generator)]
        blocks: list[RowBlock] = []
    else:
        activations = [Activation(w, rows=torch.arange(a, b, device=device))
                       for (lane, _), (a, b) in zip(work, bounds) for w in lane.below]
        blocks = [RowBlock(lane.weights, a, b, length=max(len(r) for r in lane_rows), generator=lane.generator)
                  for (lane, lane_rows), (a, b) in zip(work, bounds)]
    model.train()
    for lane, _ in work:
        lane.optimizer.zero_grad(set_to_none=True)
    with runtime.activate(activations, blocks), _autocast(precision, device):
        sums = loss_sums(model, batch, bounds)
    stepping, objective = [], 0.0
    for (lane, _), (summed, n) in zip(work, sums):
        if n == 0:
            continue  # no loss: no step (see above)
        loss = summed / n
        if not torch.isfinite(loss):
            lane.error = f"the training loss became {loss.item()} at step {lane.steps + 1}"
            continue
        stepping.append((lane, loss))
        objective = objective + loss + lane.pull.penalty(lane.weights)
    if not stepping:
        return
    objective.backward()
    for lane, loss in stepping:
        norm = torch.nn.utils.clip_grad_norm_(lane.flat, lane.config.grad_clip)
        if not torch.isfinite(norm):
            lane.error = f"the gradient became {float(norm)} at step {lane.steps + 1}"
            continue
        lane.optimizer.step()
        lane.losses.append(loss.item())
        lane.steps += 1


def optimize(model: torch.nn.Module, runtime: LoraRuntime, weights: AdapterWeights, below: Sequence[AdapterWeights],
             pull: Pull, train_set: TokenizedSet, replay_examples: Sequence[Example], config: UpdateConfig, *,
             pad_id: int, progress: bool = False, precision: str = "fp32") -> tuple[list[float], int]:
    """Train ``weights``' factors (trainable tensors, updated in place) over the frozen layers ``below``;
    return each step's loss (without the pull) and the number of steps. :class:`NonFiniteWeights` when the
    loss or gradient stops being finite (nothing is published)."""
    from tqdm.auto import tqdm

    lane = Lane(weights, below, pull, train_set, replay_examples, config, next(model.parameters()).device)
    bar = tqdm(total=lane.total, desc="update", unit="step", disable=not progress, leave=False)
    try:
        while not lane.done:
            train_step(model, runtime, [(lane, lane.take())], pad_id=pad_id, precision=precision)
            bar.update(1)
            if lane.losses:
                bar.set_postfix(loss=f"{lane.losses[-1]:.4f}")
    finally:
        bar.close()
        model.eval()
    lane.check()
    return lane.losses, lane.steps
