"""Updating many adapters at once (issue 15): several adapters' training steps share one pass of the base.

``Trainer.update_many(refs)`` (and ``persona update --all``) keeps up to ``max_adapters_per_step``
updates open at a time. Each is prepared and finished by the very steps of a single update
(:meth:`Trainer._begin`: lock, pending queue, parent hash-checked, held-out split, replay,
supersession, the gate's baseline; :meth:`Trainer._finish`: evaluate, gate, publish, replay; then
the pending rows are consumed). In between, their training steps are packed into shared batches:
each step takes open adapters' next batches whole (an adapter's batch is never split), in turn,
while their rows fit ``rows_per_step`` and their padded tokens (rows x the step's longest row)
``tokens_per_step``, and runs them as one forward/backward
(:func:`~.optimize.train_step`: a block of rows per adapter, each with its own factors, optimizer,
schedule, replay sampler and dropout stream). An adapter therefore takes the same steps on the same
rows as alone, and its result does not depend on what shared its batches.

One adapter's failure (bad pending data, a lock held elsewhere, a non-finite loss, a failed publish)
is an :class:`UpdateFailure` with its reason; the others go on. An interrupt publishes nothing more:
each open update holds only its lock, released on the way out, and a version is published (and its
pending rows consumed) by the same crash-safe steps as a single update.

``rows_per_step=0`` with ``tokens_per_step=0`` (the default) runs today's path instead: one
:meth:`Trainer.update` after another.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..refs import AdapterRef, parse_ref
from .optimize import Lane, train_step, training_precision

if TYPE_CHECKING:
    from ..lora_runtime import AdapterWeights
    from ..store import PendingBatch
    from .config import BulkConfig, UpdateConfig
    from .regularize import Pull
    from .trainer import Trainer, UpdateResult, _Job

__all__ = ["UpdateFailure", "update_many"]


@dataclass(frozen=True)
class UpdateFailure:
    """An adapter of a bulk update that published nothing, and why."""

    adapter: str
    error: str  # the error's class name, as in the CLI's JSON errors
    reason: str

    @classmethod
    def of(cls, ref: AdapterRef, exc: Exception) -> UpdateFailure:
        return cls(ref.id, type(exc).__name__, str(exc) or type(exc).__name__)

    def to_dict(self) -> dict[str, Any]:
        """``{"adapter", "error": {"type", "message"}}``: the CLI's JSON error body, per adapter."""
        return {"adapter": self.adapter, "error": {"type": self.error, "message": self.reason}}


@dataclass(eq=False)
class _Open:
    """An update in progress: its lock, the pending rows it consumes, its prepared job and its lane."""

    ref: AdapterRef
    locks: ExitStack
    batch: PendingBatch | None
    job: _Job
    weights: AdapterWeights
    pull: Pull
    lane: Lane


def update_many(trainer: Trainer, refs: Sequence[str | AdapterRef], config: UpdateConfig, bulk: BulkConfig, *,
                progress: bool = False) -> list[UpdateResult | UpdateFailure]:
    """Update each of ``refs`` from its pending queue; one result or failure per adapter, in order."""
    from tqdm.auto import tqdm

    order = list(dict.fromkeys(parse_ref(r).unpinned() for r in refs))
    outcome: dict[AdapterRef, UpdateResult | UpdateFailure] = {}
    bar = tqdm(total=len(order), desc="update --all", unit="adapter", disable=not progress)
    try:
        if bulk.sequential:
            for ref in order:
                outcome[ref] = _attempt(ref, lambda ref=ref: trainer.update(ref, None, config))
                bar.update(1)
        else:
            _run_packed(trainer, order, config, bulk, outcome, bar)
    finally:
        bar.close()
    return [outcome[ref] for ref in order]


# The store refusing writes (a full disk, a read-only mount, a quota) fails every adapter alike: the run
# stops with that one error instead of training the rest only to fail at their publish.
STORE_WIDE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def _attempt(ref: AdapterRef, action):
    try:
        return action()
    except OSError as exc:
        if exc.errno in STORE_WIDE_ERRNOS:
            raise
        return UpdateFailure.of(ref, exc)
    except Exception as exc:  # noqa: BLE001 - one adapter's failure is its result; the others go on
        return UpdateFailure.of(ref, exc)


def _run_packed(trainer: Trainer, order: list[AdapterRef], config: UpdateConfig, bulk: BulkConfig,
                outcome: dict, bar) -> None:
    precision = training_precision(config.precision, trainer.model)
    waiting = list(order)
    open_: list[_Open] = []
    steps = rows = 0
    started = time.perf_counter()
    try:
        while waiting or open_:
            while waiting and len(open_) < bulk.max_adapters_per_step:
                ref = waiting.pop(0)
                opened = _attempt(ref, lambda ref=ref: _open(trainer, ref, config))
                if isinstance(opened, _Open):
                    open_.append(opened)
                else:
                    outcome[ref] = opened
                    bar.update(1)
            ready = [o for o in open_ if not o.lane.done]
            if ready:
                work = _pack(ready, bulk.rows_per_step, bulk.tokens_per_step)
                taken = [(o.lane, o.lane.take()) for o in work]
                try:
                    train_step(trainer.model, trainer.runtime, taken, pad_id=trainer.pad_id, precision=precision)
                except Exception as exc:  # noqa: BLE001 - a failed shared step fails the updates in it
                    for o in work:
                        o.lane.error = f"a shared training step failed: {type(exc).__name__}: {exc}"
                steps += 1
                rows += sum(len(r) for _, r in taken)
                open_ = [o for o in open_ if o not in work] + work  # the ones left out go first next time
                bar.set_postfix(steps=steps, rows_per_s=f"{rows / max(time.perf_counter() - started, 1e-9):.1f}")
            for o in [o for o in open_ if o.lane.done]:
                open_.remove(o)
                try:
                    outcome[o.ref] = _attempt(o.ref, lambda o=o: _close(trainer, o, precision))
                finally:  # an interrupt while publishing frees this lock too
                    o.locks.close()
                bar.update(1)
    finally:
        trainer.model.eval()
        for o in open_:  # interrupted: these publish nothing; their locks go now
            o.locks.close()


def _pack(ready: list[_Open], rows_budget: int, tokens_budget: int = 0) -> list[_Open]:
    """The open updates whose next batches fit the budgets, in turn (at least one).

    ``rows_budget`` caps the step's rows, ``tokens_budget`` its padded tokens: rows x the longest row of the
    step, since every row is padded to it; that is what a step's activations (its memory) and the base's
    FLOPs grow with. 0: no cap of that kind."""
    work, rows, longest = [], 0, 0
    for o in ready:
        batch = o.lane.peek()
        n, length = len(batch), max((len(r) for r in batch), default=0)
        over_rows = rows_budget and rows + n > rows_budget
        over_tokens = tokens_budget and (rows + n) * max(longest, length) > tokens_budget
        if work and (over_rows or over_tokens):
            continue
        work.append(o)
        rows, longest = rows + n, max(longest, length)
    return work


def _open(trainer: Trainer, ref: AdapterRef, config: UpdateConfig) -> _Open:
    """Lock ``ref`` and run a single update's first steps on its pending queue."""
    locks = ExitStack()
    try:
        locks.enter_context(trainer.store.lock(ref, purpose="update"))
        interactions, batch = trainer._interactions(ref, None)
        job = trainer._begin(ref, interactions, config)
        weights, pull = trainer._trainable(job.parent, job.data, config)
        lane = Lane(weights, job.parent.below, pull, job.data.train, job.data.replay_examples, config, trainer.device)
    except BaseException:
        locks.close()
        raise
    return _Open(ref, locks, batch, job, weights, pull, lane)


def _close(trainer: Trainer, o: _Open, precision: str) -> UpdateResult:
    """A single update's last steps: gate, publish, renew replay, consume the pending rows."""
    o.lane.check()
    trained = trainer._trained(o.weights, o.lane.losses, o.lane.steps, o.pull, precision)
    result = trainer._finish(o.job, trained, pending=o.batch.record() if o.batch else None)
    trainer._consume(o.ref, o.batch, result)
    return result
