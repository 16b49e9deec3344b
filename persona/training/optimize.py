"""The optimization loop of an update: AdamW on one adapter's LoRA factors, with rehearsal and a pull.

Each step takes a batch of new rows (length-grouped, seeded), adds replayed rows on top (rehearsal
must not slow how fast the new data is learned: fewer new rows per step would mean more steps for
the same epochs), and minimizes the mean next-token loss plus the :class:`~.regularize.Pull`.
Only the forward/backward may run in bf16 autocast (:func:`training_precision`); the factors and
the optimizer state stay fp32.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Sequence

import torch

from ..lora_runtime import Activation, AdapterWeights, LoraRuntime
from .batches import batch_indices, collate
from .evaluate import loss_sum
from .regularize import Pull
from .supersede import sample_replay
from .tokenize import Example, TokenizedSet

if TYPE_CHECKING:
    from .config import UpdateConfig

__all__ = ["optimize", "training_precision"]


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


def optimize(model: torch.nn.Module, runtime: LoraRuntime, weights: AdapterWeights, below: Sequence[AdapterWeights],
             pull: Pull, train_set: TokenizedSet, replay_examples: Sequence[Example], config: UpdateConfig, *,
             pad_id: int, progress: bool = False, precision: str = "fp32") -> tuple[list[float], int]:
    """Train ``weights``' factors (trainable tensors, updated in place) over the frozen layers ``below``;
    return each step's loss (without the pull) and the number of steps."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    n_replay = round(config.batch_size * config.replay_fraction) if replay_examples else 0
    n_new = config.batch_size
    flat = [p for pair in weights.factors.values() for p in pair]
    optimizer = torch.optim.AdamW(flat, lr=config.learning_rate, weight_decay=0.0)
    per_epoch = math.ceil(len(train_set) / n_new)
    total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
    losses: list[float] = []
    model.train()
    step = 0
    bar = tqdm(total=total, desc="update", unit="step", disable=not progress, leave=False)
    try:
        with runtime.activate([Activation(w.to(device)) for w in below] + [Activation(weights)]):
            for epoch in range(config.epochs):
                for indices in batch_indices(train_set.examples, n_new, seed=config.seed + epoch):
                    if step >= total:
                        break
                    rows = [train_set.examples[i] for i in indices]
                    if n_replay:
                        rows += sample_replay(rng, replay_examples, n_replay, config.replay_recency)
                    batch = collate(rows, pad_id)
                    with _autocast(precision, device):
                        summed, n = loss_sum(model, batch)
                    loss = summed / max(n, 1)
                    objective = loss + pull.penalty(weights)
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
        model.eval()
    return losses, step
