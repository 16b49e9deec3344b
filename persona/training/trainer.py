"""Incremental training: update one adapter from new interactions, keeping what it already knew.

``Trainer.update(ref, interactions)`` runs these steps, each a method of :class:`Trainer`:

1. validates and tokenizes the data first (a bad file trains and writes nothing), splitting a
   seeded held-out slice off the new data (``_prepare``);
2. starts from the adapter's ``current`` version, the base loaded once and frozen (``_load_parent``);
3. measures the parent on the held-out slice and on a seeded sample of the replay buffer
   (``_measure``, :mod:`.evaluate`): the gate's baseline. Replay rows that the new data revises,
   found by :mod:`.supersede`, are neither replayed nor evaluated, and leave the buffer when the
   version is promoted;
4. trains only that adapter's LoRA factors (``_train``, :mod:`.optimize`: bf16 autocast where the
   hardware has it), each batch of new rows getting rows from the replay buffer on top (rehearsal)
   and, with ``reg="l2"`` or ``"ewc"`` (off by default), a pull toward the parent version
   (:mod:`.regularize`: EWC weighs it by a diagonal Fisher stored beside the parent);
5. measures the new weights the same way and asks the gate (:mod:`.gate`): ``current`` only if it
   is better on the new data and its replay loss rose by at most ``max_forgetting`` (relative) or
   ``forgetting_floor`` (nats per token, whichever allows more), else ``candidate``, with the
   reason recorded in ``meta.json``. ``force=True`` promotes anyway;
6. publishes the new version with its :class:`UpdateMetrics` and the held-out slice it was judged on
   (kept for ``persona eval --matrix``, :mod:`.matrix`), then renews the replay buffer.

Nothing is published until step 6, and publishing is atomic, so an interrupted update leaves the
store as it was.

``Trainer.update_many(refs)`` (``persona update --all``) runs steps 1-3 and 5-6 of each adapter
through the same methods (``_begin``, ``_finish``) and packs their step 4 into shared batches
(:mod:`.bulk`, :func:`.optimize.train_step`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import torch

from ..base import BaseModel, check_base, load_base
from ..errors import InvalidConfig, InvalidInteractions
from ..interactions import Interaction, data_digest
from ..lora_runtime import AdapterWeights, LoraRuntime
from ..refs import CANDIDATE, CURRENT, AdapterRef, parse_ref
from ..store import NewVersion, PendingBatch, ReplayBuffer, Store, VersionInfo
from .bulk import UpdateFailure, update_many
from .config import FORGETTING_FLOOR, HOLDOUT_MIN_ROWS, BulkConfig, UpdateConfig  # noqa: F401 - re-exported: UpdateConfig moved to config.py
from .evaluate import EvalResult, Evaluator, evaluate_versions, layers_below
from .gate import GateDecision, decide
from .matrix import LossMatrix, loss_matrix
from .optimize import optimize, training_precision
from .regularize import Pull, anchor_of, estimate_fisher, fisher_by_module
from .supersede import Supersession, SupersessionDetector
from .tokenize import Example, TokenizedSet, tokenize_interactions

__all__ = ["BulkConfig", "EvalResult", "Trainer", "UpdateConfig", "UpdateFailure", "UpdateMetrics", "UpdateResult",
           "log_interactions", "split_holdout"]

# The EWC Fisher estimate, a side file of the version (the store writes it as fisher.train, where no
# loader globbing *.safetensors picks it up; versions written before issue 13 hold fisher.safetensors).
FISHER_FILE = "fisher"


@dataclass(frozen=True)
class UpdateMetrics:
    """What an update measured; :meth:`to_dict` is what ``meta.json`` records under ``metrics``.

    Losses are mean next-token losses per target token; NaN (nothing to measure: no held-out
    slice, no replay yet) is written as ``null``.
    """

    heldout_loss_before: float
    heldout_loss_after: float
    heldout_tokens: int
    replay_loss_before: float
    replay_loss_after: float
    replay_tokens: int
    forgetting: float  # replay loss after - before (0.0 with no replay sample)
    train_loss_first: float
    train_loss_last: float
    steps: int
    train_examples: int
    heldout_examples: int
    replay_examples: int  # replay rows available for rehearsal (superseded rows left out)
    replay_eval_examples: int  # the gate's seeded sample of them
    truncated: int
    dropped: int
    seconds: float
    gate: GateDecision
    superseded: Mapping[str, Any]  # Supersession.to_metrics()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["gate"] = self.gate.to_dict()
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: the version it published, whether it became current, and why."""

    adapter: str
    version: VersionInfo
    parent: int
    promoted: bool
    reason: str
    metrics: Mapping[str, Any]  # UpdateMetrics.to_dict(), as recorded in meta.json

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version.version,
            "label": self.version.label,
            "parent": self.parent,
            "promoted": self.promoted,
            "alias": CURRENT if self.promoted else CANDIDATE,
            "reason": self.reason,
            "metrics": dict(self.metrics),
        }


def split_holdout(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded split into (train, held-out). Held-out gets round(n * fraction), at least 1 when n >= 4."""
    n = len(items)
    k = 0 if fraction <= 0 or n < HOLDOUT_MIN_ROWS else max(1, round(n * fraction))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# The values passed between the steps of one update.
@dataclass(frozen=True)
class _Parent:
    info: VersionInfo
    adapter_config: Mapping[str, Any]
    weights: AdapterWeights
    below: list[AdapterWeights]  # frozen layers beneath (a layered adapter's pin): only this adapter learns


@dataclass(frozen=True)
class _UpdateData:
    train: TokenizedSet
    held: TokenizedSet
    held_items: list[Interaction]  # the held-out slice as given: kept with the version (``persona eval --matrix``)
    replay: ReplayBuffer
    supersession: Supersession
    replay_examples: list[Example]  # rehearsal rows: the buffer without superseded rows
    gate_replay: list[Example]  # the gate's seeded sample of them


@dataclass(frozen=True)
class _Losses:
    held: float
    held_tokens: int
    replay: float
    replay_tokens: int


@dataclass(frozen=True)
class _Trained:
    weights: AdapterWeights
    losses: list[float]
    steps: int
    reg: str  # the pull applied: "none" when the parent was never trained
    precision: str


@dataclass(frozen=True)
class _Job:
    """An update between its start (parent loaded, data prepared, baseline measured) and its training."""

    ref: AdapterRef
    interactions: list[Interaction]
    config: UpdateConfig
    parent: _Parent
    data: _UpdateData
    before: _Losses
    started: float  # perf_counter at the start: metrics.seconds
    memory: Mapping[str, Any] | None  # the adapter's memory snapshot as the update started (issue 16)


class Trainer:
    """Holds one frozen base (loaded once) and updates adapters of one store on it.

    >>> trainer = Trainer(Store.open())                                   # doctest: +SKIP
    >>> result = trainer.update("user:alice", read_interactions("alice.jsonl"))   # doctest: +SKIP
    >>> result.version.label, result.promoted                             # doctest: +SKIP
    ('v0002', True)
    """

    def __init__(self, store: Store, base: BaseModel | None = None, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, origin: str | None = None):
        """``device``/``dtype`` place the base the trainer loads (``persona update --device/--dtype``):
        ``"auto"`` (the default) is a GPU in bfloat16 where torch sees one, else the CPU in float32
        (:func:`persona.base.resolve_device`; on a GPU without bfloat16, float32). They do not apply to a
        given ``base``. Whatever the base's dtype, the trained LoRA factors, their gradients and the
        optimizer state are float32 on the base's device. ``origin`` tags every version it publishes
        (``meta.json`` ``origin``, e.g. ``"auto-update"`` for the server's learning loop)."""
        self.store = store
        self.origin = origin
        if base is None:
            base = load_base(store.config.base_id, device=device or "auto", dtype=dtype or "auto", training=True)
        elif device is not None or dtype is not None:
            raise InvalidConfig("device and dtype place a base the trainer loads; a given base stays where it is "
                                "(load it with load_base(..., device=..., dtype=...))")
        self.base = base
        check_base(self.base.info, base_id=store.config.base_id, fingerprint=store.config.base_fingerprint,
                   store_root=store.root)
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.runtime = LoraRuntime.attach(self.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.evaluator = Evaluator(self.model, self.runtime, self.pad_id)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ evaluation
    def tokenize(self, interactions: Sequence[Interaction], max_length: int = 512) -> TokenizedSet:
        return tokenize_interactions(interactions, self.tokenizer, max_length=max_length)

    def loss(self, examples: Sequence[Example], weights: AdapterWeights | None, batch_size: int = 8,
             below: Sequence[AdapterWeights] = ()) -> tuple[float, int]:
        """Mean loss per target token (and the token count) of ``weights`` (None: the base alone),
        on top of the frozen layers ``below`` (a layered adapter's domain adapter)."""
        return self.evaluator.loss(examples, weights, batch_size, below)

    def evaluate(self, ref: str | AdapterRef, interactions: Sequence[Interaction], versions: Sequence[str] | None = None,
                 max_length: int = 512) -> list[EvalResult]:
        """Held-out loss and perplexity of one or several versions (``"base"``: no adapter) on the data.

        A layered adapter's version is evaluated over its pinned layer, as it is trained and served
        (``EvalResult.over`` names the layer)."""
        ref = parse_ref(ref)
        return evaluate_versions(self.store, self.evaluator, ref, self.tokenize(interactions, max_length), versions)

    def loss_matrix(self, ref: str | AdapterRef, max_length: int = 512) -> LossMatrix:
        """The continual-learning matrix of ``ref``: the base and each version up to the one ``ref`` names,
        on every kept held-out slice, with BWT, FWT and gain over the base (:mod:`.matrix`)."""
        return loss_matrix(self.store, self.evaluator, self.tokenizer, parse_ref(ref), max_length=max_length)

    # ------------------------------------------------------------------ training
    def update(
        self,
        ref: str | AdapterRef,
        interactions: Sequence[Interaction] | None = None,
        config: UpdateConfig | None = None,
        *,
        progress: bool = False,
    ) -> UpdateResult:
        """Train ``ref``'s current version on ``interactions`` (None: its pending queue) and publish.

        With ``interactions=None`` the pending queue is consumed: the interactions trained on are
        removed from it only after the new version is published, and the version records them, so
        a crash in between does not train them again (see :mod:`persona.store.queues`).
        """
        config = config or UpdateConfig()
        self._refuse_float16()
        ref = parse_ref(ref).unpinned()
        with self.store.lock(ref, purpose="update"):
            interactions, batch = self._interactions(ref, interactions)
            result = self._train_and_publish(ref, interactions, config, progress,
                                             pending=batch.record() if batch else None)
            self._consume(ref, batch, result)
        return result

    def _refuse_float16(self) -> None:
        if self.dtype == torch.float16:  # before the lock and the pending queue: nothing is touched
            raise InvalidConfig("training over a float16 base is refused: its gradients underflow without loss "
                                "scaling; load it with --dtype bfloat16 or float32 (float16 is for serving)")

    def _interactions(self, ref: AdapterRef, interactions: Sequence[Interaction] | None
                      ) -> tuple[list[Interaction], PendingBatch | None]:
        """What to train on: the given interactions, or (None) the pending queue as a batch to consume."""
        batch = None
        if interactions is None:
            self.store.show(ref)  # AdapterNotFound before "nothing pending"
            batch = self.store.take_pending(ref)
            interactions = list(batch.interactions)
            if not interactions:
                raise InvalidInteractions(
                    f"{ref.id} has no pending interactions: pass --data FILE, or log some with `persona log {ref.id} --data FILE`"
                )
        interactions = list(interactions)
        if not interactions:
            raise InvalidInteractions("no interactions to train on")
        return interactions, batch

    def _consume(self, ref: AdapterRef, batch: PendingBatch | None, result: UpdateResult) -> None:
        if batch is not None:  # only now that the version is published (it records the batch)
            self.store.consume_pending(ref, batch, result.version.version)

    def _train_and_publish(self, ref: AdapterRef, interactions: list[Interaction], config: UpdateConfig,
                           progress: bool, pending: Mapping[str, Any] | None = None) -> UpdateResult:
        job = self._begin(ref, interactions, config)
        return self._finish(job, self._train(job.parent, job.data, config, progress), pending)

    def _begin(self, ref: AdapterRef, interactions: list[Interaction], config: UpdateConfig) -> _Job:
        """Steps 1-3: the parent, the data (split, replay, supersession) and the gate's baseline."""
        started = time.perf_counter()
        # The memory as this update starts (issue 16): which logged facts the new weights may know.
        memory = self.store.memory(ref).snapshot().record() if ref.kind == "user" else None
        parent = self._load_parent(ref)
        data = self._prepare(ref, interactions, config)
        before = self._measure(parent.weights, data, parent.below)
        return _Job(ref, interactions, config, parent, data, before, started, memory)

    def _finish(self, job: _Job, trained: _Trained, pending: Mapping[str, Any] | None = None) -> UpdateResult:
        """Steps 5-6: measure the trained weights, gate, publish, renew the replay buffer."""
        ref, parent, data, config = job.ref, job.parent, job.data, job.config
        after = self._measure(trained.weights, data, parent.below)
        decision = self._judge(job.before, after, data.supersession, config)
        extra = {}
        if config.reg == "ewc":
            extra[FISHER_FILE] = self._fisher(trained.weights, [*data.train.examples, *data.replay_examples], config,
                                              parent.below)
        metrics = self._metrics(data, job.before, after, trained, decision,
                                seconds=round(time.perf_counter() - job.started, 3))
        version = self.store.publish_version(ref, NewVersion(
            trained.weights.to_peft(),
            parent.adapter_config,
            parent=parent.info.version,
            metrics=metrics.to_dict(),
            training=config.to_dict() | {"reg_applied": trained.reg, "precision_applied": trained.precision,
                                         "device": self.device.type, "base_dtype": str(self.dtype).removeprefix("torch.")},
            data_digest=data_digest(job.interactions),
            extra_files=extra,
            settings=None,
            pending=pending,
            heldout=data.held_items,
            origin=self.origin,
            memory=job.memory,
        ), set_alias=CURRENT if decision.promoted else CANDIDATE)
        self._renew_replay(ref, data, job.interactions, config, decision.promoted)
        return UpdateResult(ref.id, version, parent.info.version, decision.promoted, decision.reason, metrics.to_dict())

    def _load_parent(self, ref: AdapterRef) -> _Parent:
        info = self.store.version_info(ref)
        loaded = self.store.load(info.ref)
        weights = AdapterWeights.from_peft(loaded.tensors, loaded.config).to(self.device)  # float32 beside the base
        self.runtime.check(weights)
        return _Parent(info, loaded.config, weights, [w.to(self.device) for w in layers_below(self.store, info)])

    def _prepare(self, ref: AdapterRef, interactions: list[Interaction], config: UpdateConfig) -> _UpdateData:
        train_items, held_items = split_holdout(interactions, config.holdout_fraction, config.seed)
        train_set = self.tokenize(train_items, config.max_length)
        held_set = self.tokenize(held_items, config.max_length)
        if not train_set.examples:
            raise InvalidInteractions("after truncation no example has a token to train on; raise max_length")
        replay = self.store.replay(ref)
        # Rows the new data revises are neither replayed nor counted as forgetting (issue 11).
        supersession = self._supersession(replay.items, interactions, config)
        replay_set = self.tokenize(list(supersession.kept), config.max_length) if supersession.kept else None
        replay_examples = list(replay_set.examples) if replay_set else []
        # The gate judges forgetting on a fixed seeded sample of the buffer: the buffer grows with
        # every update, and evaluating all of it twice would soon cost more than the training.
        gate_replay = random.Random(config.seed + 11).sample(replay_examples, min(config.gate_replay_samples, len(replay_examples)))
        return _UpdateData(train_set, held_set, held_items, replay, supersession, replay_examples, gate_replay)

    def _supersession(self, replay_items, interactions, config: UpdateConfig) -> Supersession:
        if not config.supersede or not replay_items:
            return Supersession.none(replay_items, config.supersede_threshold)
        detector = getattr(self, "_detector", None)
        if detector is None or detector.threshold != config.supersede_threshold:
            detector = self._detector = SupersessionDetector(self.model, self.tokenizer, config.supersede_threshold)
        return detector.detect(replay_items, interactions)

    def _measure(self, weights: AdapterWeights, data: _UpdateData, below: Sequence[AdapterWeights]) -> _Losses:
        # One batched pass scores both sets (issue 15: a 4-row slice and a 32-row sample were five forwards).
        (held, held_tokens), (replay, replay_tokens) = self.evaluator.losses([data.held.examples, data.gate_replay],
                                                                             weights, below=below)
        return _Losses(held, held_tokens, replay, replay_tokens)

    def _train(self, parent: _Parent, data: _UpdateData, config: UpdateConfig, progress: bool) -> _Trained:
        weights, pull = self._trainable(parent, data, config)
        precision = training_precision(config.precision, self.model)
        losses, steps = self._optimize(weights, parent.below, pull, data.train, data.replay_examples, config, progress,
                                       precision)
        return self._trained(weights, losses, steps, pull, precision)

    def _trainable(self, parent: _Parent, data: _UpdateData, config: UpdateConfig) -> tuple[AdapterWeights, Pull]:
        """Step 4's start: trainable copies of the parent's factors, and the pull toward the parent."""
        params = {m: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for m, (a, b) in parent.weights.factors.items()}
        pull = self._pull(parent, data.replay_examples, config)
        return AdapterWeights(factors=params, scale=parent.weights.scale, dropout=parent.weights.dropout), pull

    @staticmethod
    def _trained(weights: AdapterWeights, losses: list[float], steps: int, pull: Pull, precision: str) -> _Trained:
        frozen = AdapterWeights({m: (a.detach(), b.detach()) for m, (a, b) in weights.factors.items()}, weights.scale)
        return _Trained(frozen, losses, steps, pull.kind, precision)

    def _optimize(self, weights: AdapterWeights, below: Sequence[AdapterWeights], pull: Pull, train_set: TokenizedSet,
                  replay_examples: list[Example], config: UpdateConfig, progress: bool,
                  precision: str = "fp32") -> tuple[list[float], int]:
        return optimize(self.model, self.runtime, weights, below, pull, train_set, replay_examples, config,
                        pad_id=self.pad_id, progress=progress, precision=precision)

    def _pull(self, parent: _Parent, replay_examples: list[Example], config: UpdateConfig) -> Pull:
        kind = config.reg if parent.info.training is not None else "none"  # a fresh v1 holds nothing worth anchoring to
        # No pull, no anchor: a copy of every factor per open update for nothing (update --all holds several).
        anchor = anchor_of(parent.weights) if kind != "none" else {}
        fisher = self._parent_fisher(parent, replay_examples, config) if kind == "ewc" else None
        return Pull(kind, config.reg_strength, anchor, fisher)

    def _parent_fisher(self, parent: _Parent, replay_examples: list[Example], config: UpdateConfig):
        """The parent's stored Fisher, else one estimated now on the replay buffer (the past data)."""
        stored = self.store.load_extra(parent.info.ref, FISHER_FILE)
        if stored is None:
            if not replay_examples:
                return None
            stored = self._fisher(parent.weights, replay_examples, config, parent.below)
        return fisher_by_module(stored, list(parent.weights.factors), self.device)

    def _fisher(self, weights: AdapterWeights, pool: Sequence[Example], config: UpdateConfig,
                below: Sequence[AdapterWeights] = ()) -> dict[str, torch.Tensor]:
        return estimate_fisher(self.model, self.runtime, weights, pool, samples=config.fisher_samples, seed=config.seed,
                               pad_id=self.pad_id, below=below)

    @staticmethod
    def _judge(before: _Losses, after: _Losses, supersession: Supersession, config: UpdateConfig) -> GateDecision:
        decision = decide(before.held, after.held, before.replay, after.replay, max_forgetting=config.max_forgetting,
                          forgetting_floor=config.forgetting_floor, force=config.force)
        if supersession.count:
            note = f"; {supersession.count} superseded replay row(s) left out of replay and the forgetting check"
            decision = replace(decision, reason=decision.reason + note)
        return decision

    @staticmethod
    def _metrics(data: _UpdateData, before: _Losses, after: _Losses, trained: _Trained, decision: GateDecision, *,
                 seconds: float) -> UpdateMetrics:
        return UpdateMetrics(
            heldout_loss_before=before.held,
            heldout_loss_after=after.held,
            heldout_tokens=after.held_tokens,
            replay_loss_before=before.replay,
            replay_loss_after=after.replay,
            replay_tokens=after.replay_tokens,
            forgetting=(after.replay - before.replay) if data.gate_replay else 0.0,
            train_loss_first=trained.losses[0],
            train_loss_last=trained.losses[-1],
            steps=trained.steps,
            train_examples=len(data.train),
            heldout_examples=len(data.held),
            replay_examples=len(data.replay_examples),
            replay_eval_examples=len(data.gate_replay),
            truncated=data.train.truncated + data.held.truncated,
            dropped=data.train.dropped + data.held.dropped,
            seconds=seconds,
            gate=decision,
            superseded=data.supersession.to_metrics(),
        )

    def _renew_replay(self, ref: AdapterRef, data: _UpdateData, interactions: list[Interaction],
                      config: UpdateConfig, promoted: bool) -> None:
        replay, supersession = data.replay, data.supersession
        if supersession.count and promoted:
            replay = ReplayBuffer(supersession.kept, replay.seen)  # the revised rows leave the buffer
        if promoted and (config.replay_capacity or supersession.count):
            # Only data a current version learned joins the reservoir; a rejected candidate's does not.
            self.store.write_replay(ref, replay.offer(interactions, config.replay_capacity, config.seed))

    def update_many(self, refs: Sequence[str | AdapterRef], config: UpdateConfig | None = None,
                    bulk: BulkConfig | None = None, *, progress: bool = False) -> list[UpdateResult | UpdateFailure]:
        """Update each of ``refs`` from its pending queue, their training steps packed into shared batches.

        One :class:`UpdateResult` (as :meth:`update` gives) or :class:`UpdateFailure` (with the reason)
        per adapter, in the order given: one adapter's failure does not stop the others. Each adapter
        trains as it would alone (same batches, optimizer, replay, gate); ``bulk`` sets how many rows
        and adapters a step holds (``rows_per_step=0``: one :meth:`update` after another). See :mod:`.bulk`.

        >>> outcome = trainer.update_many(["user:alice", "user:bob"], UpdateConfig(epochs=1))   # doctest: +SKIP
        >>> [r.to_dict()["adapter"] for r in outcome]                                           # doctest: +SKIP
        ['user:alice', 'user:bob']
        """
        self._refuse_float16()
        return update_many(self, refs, config or UpdateConfig(), bulk or BulkConfig(), progress=progress)

    def update_all(self, config: UpdateConfig | None = None, bulk: BulkConfig | None = None, *, progress: bool = False,
                   exclude: Sequence[str | AdapterRef] = (), min_pending: int = 1) -> list[UpdateResult | UpdateFailure]:
        """:meth:`update_many` of :meth:`pending_adapters`, the base loaded once."""
        return self.update_many(self.pending_adapters(exclude, min_pending), config, bulk, progress=progress)

    def pending_adapters(self, exclude: Sequence[str | AdapterRef] = (), min_pending: int = 1) -> list[AdapterRef]:
        """Adapters with ``min_pending`` pending rows or more, but ``exclude`` (the others' rows wait)."""
        left_out = {parse_ref(r).unpinned() for r in exclude}
        found = []
        for adapter in self.store.list():
            ref = AdapterRef(adapter.kind, adapter.name)
            if ref in left_out or adapter.pending < max(1, min_pending):
                continue
            # Rows a published version consumed before a crash are not pending any more.
            if adapter.pending - self.store.drop_consumed_pending(ref) >= max(1, min_pending):
                found.append(ref)
        return found


def log_interactions(store: Store, ref: str | AdapterRef, interactions: Sequence[Interaction]) -> int:
    """Append validated interactions to an adapter's pending queue; returns how many."""
    return store.log(ref, interactions)
