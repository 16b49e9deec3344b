"""Incremental training: update one adapter from new interactions, keeping what it already knew.

``Trainer.update(ref, interactions)``:

1. validates and tokenizes the data first (a bad file trains and writes nothing);
2. splits a held-out slice of the new data (seeded);
3. starts from the adapter's ``current`` version, the base loaded once and frozen;
4. trains only that adapter's LoRA factors (bf16 autocast where the hardware has it), each batch of
   new rows getting rows from the adapter's replay buffer on top (rehearsal) and, with
   ``reg="l2"`` or ``"ewc"`` (off by default), a penalty pulling the factors toward the parent
   version (EWC weighs it by a diagonal Fisher stored beside the parent);
5. evaluates parent and new weights on the held-out slice and on a seeded sample of the replay buffer
   (replay rows that the new data revises, found by :mod:`persona.supersede`, are neither replayed
   nor evaluated, and leave the buffer when the version is promoted);
6. publishes a new version; the gate makes it ``current`` only if it is better on the new data and
   its replay loss rose by at most ``max_forgetting`` (relative) or ``forgetting_floor`` (nats per
   token, whichever allows more), else it stays ``candidate``, with
   the reason recorded in ``meta.json``. ``force=True`` promotes anyway.

Nothing is published until step 6, and publishing is atomic, so an interrupted update leaves the
store as it was.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from ..base import BaseModel, check_base, load_base
from ..interactions import (
    Example,
    Interaction,
    TokenizedSet,
    batch_indices,
    collate,
    data_digest,
    iter_batches,
    tokenize_interactions,
)
from ..errors import InvalidInteractions
from ..lora_runtime import Activation, AdapterWeights, LoraRuntime
from ..refs import CANDIDATE, CURRENT, AdapterRef, parse_ref
from ..store import NewVersion, ReplayBuffer, Store, VersionInfo
from .config import FORGETTING_FLOOR, UpdateConfig  # noqa: F401 - re-exported: UpdateConfig moved to config.py
from .supersede import Supersession, SupersessionDetector, sample_replay

FISHER_FILE = "fisher.safetensors"


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: the version it published, whether it became current, and why."""

    adapter: str
    version: VersionInfo
    parent: int
    promoted: bool
    reason: str
    metrics: Mapping[str, Any]

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


@dataclass(frozen=True)
class EvalResult:
    adapter: str
    version: str  # "v0003" or "base"
    loss: float
    perplexity: float
    tokens: int
    examples: int
    over: str | None = None  # the pinned layer evaluated beneath a layered adapter ("domain:finance@v1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_holdout(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded split into (train, held-out). Held-out gets round(n * fraction), at least 1 when n >= 4."""
    n = len(items)
    k = 0 if fraction <= 0 or n < 4 else max(1, round(n * fraction))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


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


# Architectures whose logits are exactly lm_head(last hidden state): no softcapping or scaling.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"}


def _loss_sum(model, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over labelled positions, and their count.

    For plain-head architectures the vocabulary projection is applied only at labelled positions
    (on chat data most positions are prompt), which saves a large share of each step.
    """
    labels = batch.labels[:, 1:]
    mask = labels != -100
    if getattr(model.config, "model_type", None) in _PLAIN_HEAD:
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
    return loss, int(mask.sum())


class Trainer:
    """Holds one frozen base (loaded once) and updates adapters of one store on it.

    >>> trainer = Trainer(Store.open())                                   # doctest: +SKIP
    >>> result = trainer.update("user:alice", read_interactions("alice.jsonl"))   # doctest: +SKIP
    >>> result.version.label, result.promoted                             # doctest: +SKIP
    ('v0002', True)
    """

    def __init__(self, store: Store, base: BaseModel | None = None):
        self.store = store
        self.base = base or load_base(store.config.base_id)
        check_base(self.base.info, base_id=store.config.base_id, fingerprint=store.config.base_fingerprint,
                   store_root=store.root)
        self.model = self.base.model
        self.tokenizer = self.base.tokenizer
        self.runtime = LoraRuntime.attach(self.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ evaluation
    def tokenize(self, interactions: Sequence[Interaction], max_length: int = 512) -> TokenizedSet:
        return tokenize_interactions(interactions, self.tokenizer, max_length=max_length)

    @torch.no_grad()
    def loss(self, examples: Sequence[Example], weights: AdapterWeights | None, batch_size: int = 8,
             below: Sequence[AdapterWeights] = ()) -> tuple[float, int]:
        """Mean loss per target token (and the token count) of ``weights`` (None: the base alone),
        on top of the frozen layers ``below`` (a layered adapter's domain adapter)."""
        if not examples:
            return float("nan"), 0
        total, tokens = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        stack = [Activation(w) for w in below] + ([Activation(weights)] if weights is not None else [])
        try:
            with self.runtime.activate(stack):
                for batch in iter_batches(list(examples), batch_size, shuffle=False, pad_token_id=self.pad_id):
                    loss, n = _loss_sum(self.model, batch)
                    total += float(loss)
                    tokens += n
        finally:
            self.model.train(was_training)
        return total / max(tokens, 1), tokens

    def evaluate(self, ref: str | AdapterRef, interactions: Sequence[Interaction], versions: Sequence[str] | None = None,
                 max_length: int = 512) -> list[EvalResult]:
        """Held-out loss and perplexity of one or several versions (``"base"``: no adapter) on the data.

        A layered adapter's version is evaluated over its pinned layer, as it is trained and served
        (``EvalResult.over`` names the layer)."""
        ref = parse_ref(ref)
        data = self.tokenize(interactions, max_length)
        out = []
        for selector in versions or [ref.selector]:
            below: list[AdapterWeights] = []
            over = None
            if selector == "base":
                weights, label = None, "base"
            else:
                pinned = self.store.resolve(AdapterRef.parse(f"{ref.id}@{selector}"))
                loaded = self.store.load(pinned)
                weights, label = AdapterWeights.from_peft(loaded.tensors, loaded.config), loaded.info.label
                below = self._layers_below(loaded.info)  # a layered adapter is judged as it is trained and served
                over = str(loaded.info.over_ref) if loaded.info.over_ref is not None else None
            loss, tokens = self.loss(data.examples, weights, below=below)
            out.append(EvalResult(ref.id, label, loss, math.exp(min(loss, 50)), tokens, len(data), over))
        return out

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
        ref = parse_ref(ref).unpinned()
        with self.store.lock(ref, purpose="update"):
            from_pending = interactions is None
            batch = None
            if from_pending:
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
            result = self._train_and_publish(ref, interactions, config, progress,
                                             pending=batch.record() if batch else None)
            if batch is not None:
                self.store.consume_pending(ref, batch, result.version.version)
        return result

    def _train_and_publish(self, ref: AdapterRef, interactions: list[Interaction], config: UpdateConfig,
                           progress: bool, pending: Mapping[str, Any] | None = None) -> UpdateResult:
        started = time.perf_counter()
        parent_info = self.store.version_info(ref)
        parent = self.store.load(parent_info.ref)
        parent_weights = AdapterWeights.from_peft(parent.tensors, parent.config)
        self.runtime.check(parent_weights)
        below = self._layers_below(parent_info)  # frozen: only this adapter learns

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

        # Evaluate the parent before training: the gate's baseline.
        held_before, _ = self.loss(held_set.examples, parent_weights, below=below)
        replay_before, _ = self.loss(gate_replay, parent_weights, below=below)

        params = {m: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for m, (a, b) in parent_weights.factors.items()}
        anchor = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in parent_weights.factors.items()}
        trained_parent = parent_info.training is not None  # a fresh v1 holds nothing worth anchoring to
        reg = config.reg if trained_parent else "none"
        fisher = self._fisher_for(parent_info, parent_weights, replay_examples, config, below) if reg == "ewc" else None
        weights = AdapterWeights(factors=params, scale=parent_weights.scale, dropout=parent_weights.dropout)
        precision = training_precision(config.precision, self.model)
        losses, steps = self._optimize(weights, below, anchor, fisher, reg, train_set, replay_examples, config, progress,
                                       precision)

        new_weights = AdapterWeights({m: (a.detach(), b.detach()) for m, (a, b) in params.items()}, parent_weights.scale)
        held_after, held_tokens = self.loss(held_set.examples, new_weights, below=below)
        replay_after, replay_tokens = self.loss(gate_replay, new_weights, below=below)
        promoted, reason = self._gate(held_before, held_after, replay_before, replay_after, config)
        if supersession.count:
            reason += f"; {supersession.count} superseded replay row(s) left out of replay and the forgetting check"

        extra = {}
        if config.reg == "ewc":
            extra[FISHER_FILE] = self._fisher(new_weights, train_set.examples, replay_examples, config, below)
        metrics = {
            "heldout_loss_before": held_before,
            "heldout_loss_after": held_after,
            "heldout_tokens": held_tokens,
            "replay_loss_before": replay_before,
            "replay_loss_after": replay_after,
            "replay_tokens": replay_tokens,
            "forgetting": (replay_after - replay_before) if gate_replay else 0.0,
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
            "steps": steps,
            "train_examples": len(train_set),
            "heldout_examples": len(held_set),
            "replay_examples": len(replay_examples),
            "replay_eval_examples": len(gate_replay),
            "truncated": train_set.truncated + held_set.truncated,
            "dropped": train_set.dropped + held_set.dropped,
            "seconds": round(time.perf_counter() - started, 3),
            "gate": {"promoted": promoted, "reason": reason, "forced": config.force},
            "superseded": supersession.to_metrics(),
        }
        metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        if supersession.count and promoted:
            replay = ReplayBuffer(supersession.kept, replay.seen)  # the revised rows leave the buffer
        version = self.store.publish_version(ref, NewVersion(
            new_weights.to_peft(),
            parent.config,
            parent=parent_info.version,
            metrics=metrics,
            training=config.to_dict() | {"reg_applied": reg, "precision_applied": precision},
            data_digest=data_digest(interactions),
            extra_files=extra,
            settings=None,
            pending=pending,
        ), set_alias=CURRENT if promoted else CANDIDATE)
        if promoted and (config.replay_capacity or supersession.count):
            # Only data a current version learned joins the reservoir; a rejected candidate's does not.
            self.store.write_replay(ref, replay.offer(interactions, config.replay_capacity, config.seed))
        return UpdateResult(ref.id, version, parent_info.version, promoted, reason, metrics)

    def _gate(self, held_before: float, held_after: float, replay_before: float, replay_after: float,
              config: UpdateConfig) -> tuple[bool, str]:
        if math.isnan(held_after):
            verdict, reason = False, "no held-out data to show the new version is better (give more interactions)"
        elif not held_after < held_before:
            verdict, reason = False, f"held-out loss did not improve ({held_before:.4f} -> {held_after:.4f})"
        elif not math.isnan(replay_before) and replay_after - replay_before > max(
                replay_before * config.max_forgetting, config.forgetting_floor):
            rise = replay_after / replay_before - 1 if replay_before > 0 else math.inf
            verdict, reason = False, (f"replay loss rose {rise:.1%} ({replay_before:.4f} -> {replay_after:.4f}), "
                                      f"over the {config.max_forgetting:.1%} bound and the "
                                      f"{config.forgetting_floor:.3f}-nat floor")
        else:
            forgot = "" if math.isnan(replay_before) else f", replay {replay_before:.4f} -> {replay_after:.4f}"
            verdict, reason = True, f"held-out loss improved {held_before:.4f} -> {held_after:.4f}{forgot}"
        if config.force and not verdict:
            return True, f"forced: {reason}"
        return verdict, reason

    def _supersession(self, replay_items, interactions, config: UpdateConfig) -> Supersession:
        if not config.supersede or not replay_items:
            return Supersession.none(replay_items, config.supersede_threshold)
        detector = getattr(self, "_detector", None)
        if detector is None or detector.threshold != config.supersede_threshold:
            detector = self._detector = SupersessionDetector(self.model, self.tokenizer, config.supersede_threshold)
        return detector.detect(replay_items, interactions)

    def _layers_below(self, info: VersionInfo) -> list[AdapterWeights]:
        """The pinned adapter a layered adapter sits on (empty for a plain one)."""
        if info.over_ref is None:
            return []
        loaded = self.store.load(info.over_ref)
        weights = AdapterWeights.from_peft(loaded.tensors, loaded.config)
        return [AdapterWeights(weights.factors, weights.scale, 0.0)]  # frozen layers get no dropout

    def _optimize(self, weights: AdapterWeights, below: Sequence[AdapterWeights], anchor, fisher, reg: str, train_set: TokenizedSet,
                  replay_examples: list[Example], config: UpdateConfig, progress: bool,
                  precision: str = "fp32") -> tuple[list[float], int]:
        from tqdm.auto import tqdm

        torch.manual_seed(config.seed)
        rng = random.Random(config.seed)
        device = next(self.model.parameters()).device
        # Replayed rows come on top of each batch of new rows: rehearsal must not slow how fast the
        # new data is learned (fewer new rows per step would mean more steps for the same epochs).
        n_replay = round(config.batch_size * config.replay_fraction) if replay_examples else 0
        n_new = config.batch_size
        flat = [p for pair in weights.factors.values() for p in pair]
        optimizer = torch.optim.AdamW(flat, lr=config.learning_rate, weight_decay=0.0)
        per_epoch = math.ceil(len(train_set) / n_new)
        total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
        losses: list[float] = []
        self.model.train()
        step = 0
        bar = tqdm(total=total, desc="update", unit="step", disable=not progress, leave=False)
        try:
            with self.runtime.activate([Activation(w) for w in below] + [Activation(weights)]):
                for epoch in range(config.epochs):
                    for indices in batch_indices(train_set.examples, n_new, seed=config.seed + epoch):
                        if step >= total:
                            break
                        rows = [train_set.examples[i] for i in indices]
                        if n_replay:
                            rows += sample_replay(rng, replay_examples, n_replay, config.replay_recency)
                        batch = collate(rows, self.pad_id)
                        with _autocast(precision, device):
                            loss_sum, n = _loss_sum(self.model, batch)
                        loss = loss_sum / max(n, 1)
                        objective = loss + self._penalty(weights, anchor, fisher, reg, config.reg_strength)
                        optimizer.zero_grad(set_to_none=True)
                        objective.backward()
                        torch.nn.utils.clip_grad_norm_(flat, config.grad_clip)
                        optimizer.step()
                        losses.append(loss.item())
                        step += 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        finally:
            bar.close()
            self.model.eval()
        return losses, step

    @staticmethod
    def _penalty(weights: AdapterWeights, anchor, fisher, reg: str, strength: float) -> torch.Tensor | float:
        if reg == "none" or strength == 0:
            return 0.0
        total = 0.0
        for module, (a, b) in weights.factors.items():
            a0, b0 = anchor[module]
            if fisher is None:
                total = total + ((a - a0) ** 2).sum() + ((b - b0) ** 2).sum()
            else:
                fa, fb = fisher[module]
                total = total + (fa * (a - a0) ** 2).sum() + (fb * (b - b0) ** 2).sum()
        return strength * total

    def _fisher_for(self, parent_info: VersionInfo, parent_weights: AdapterWeights, replay_examples, config, below=()):
        """The parent's stored Fisher, else one estimated now on the replay buffer (the past data)."""
        from ..peft_format import PEFT_PREFIX

        stored = self.store.load_extra(parent_info.ref, FISHER_FILE)
        if stored is None:
            if not replay_examples:
                return None
            stored = self._fisher(parent_weights, [], replay_examples, config, below)
        fisher = {}
        for module in parent_weights.factors:
            fisher[module] = (stored[f"{PEFT_PREFIX}{module}.lora_A.weight"], stored[f"{PEFT_PREFIX}{module}.lora_B.weight"])
        return fisher

    def _fisher(self, weights: AdapterWeights, examples, replay_examples, config: UpdateConfig,
                below: Sequence[AdapterWeights] = ()) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the LoRA factors, normalized to mean 1 (so reg_strength means
        the same for l2 and ewc), over up to ``fisher_samples`` examples, one at a time."""
        from ..peft_format import PEFT_PREFIX

        pool = list(examples) + list(replay_examples)
        rng = random.Random(config.seed + 7)
        sample = rng.sample(pool, min(config.fisher_samples, len(pool)))
        params = {m: (a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)) for m, (a, b) in weights.factors.items()}
        acc = {m: (torch.zeros_like(a), torch.zeros_like(b)) for m, (a, b) in params.items()}
        probe = AdapterWeights(params, weights.scale, 0.0)
        self.model.eval()
        with self.runtime.activate([Activation(w) for w in below] + [Activation(probe)]):
            for example in sample:
                batch = collate([example], self.pad_id)
                loss_sum, n = _loss_sum(self.model, batch)
                grads = torch.autograd.grad(loss_sum / max(n, 1), [p for pair in params.values() for p in pair])
                for i, m in enumerate(params):
                    acc[m][0].add_(grads[2 * i] ** 2)
                    acc[m][1].add_(grads[2 * i + 1] ** 2)
        mean = torch.cat([t.flatten() for pair in acc.values() for t in pair]).mean().clamp_min(1e-30)
        out = {}
        for m, (fa, fb) in acc.items():
            out[f"{PEFT_PREFIX}{m}.lora_A.weight"] = fa / mean
            out[f"{PEFT_PREFIX}{m}.lora_B.weight"] = fb / mean
        return out

    def update_all(self, config: UpdateConfig | None = None, *, progress: bool = False) -> list[UpdateResult]:
        """Update every adapter that has pending interactions, with the base loaded once."""
        results = []
        for adapter in self.store.list():
            # Rows a published version consumed before a crash are not pending any more.
            if adapter.pending and adapter.pending > self.store.drop_consumed_pending(AdapterRef(adapter.kind, adapter.name)):
                results.append(self.update(AdapterRef(adapter.kind, adapter.name), None, config, progress=progress))
        return results


def log_interactions(store: Store, ref: str | AdapterRef, interactions: Sequence[Interaction]) -> int:
    """Append validated interactions to an adapter's pending queue; returns how many."""
    return store.log(ref, interactions)
