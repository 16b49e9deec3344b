"""Regularization toward the parent version: the L2 or EWC pull on the LoRA factors, and the Fisher.

``reg="l2"`` adds ``strength * sum((theta - theta_parent)^2)`` to each step's loss; ``reg="ewc"``
weighs each term by a diagonal empirical Fisher, normalized to mean 1 so ``strength`` means the same
for both (docs/TRAINING.md). The Fisher is stored beside a version in PEFT key naming
(``fisher.safetensors``), so the next update of that version reuses it.

>>> pull = Pull("l2", 0.1, anchor_of(parent_weights))      # doctest: +SKIP
>>> objective = loss + pull.penalty(weights)               # doctest: +SKIP
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..lora_runtime import Activation, AdapterWeights, LoraRuntime
from ..peft_format import lora_key, peft_tensors
from .batches import collate
from .evaluate import loss_sum
from .tokenize import Example

__all__ = ["Factors", "Pull", "anchor_of", "estimate_fisher", "fisher_by_module"]

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""LoRA factors (or per-factor Fisher weights) by module name: ``module -> (A, B)``."""


def anchor_of(weights: AdapterWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Detached copies of ``weights``' factors: the point a pull draws toward."""
    return {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in weights.factors.items()}


@dataclass(frozen=True, eq=False)
class Pull:
    """The penalty pulling trained factors toward ``anchor``: ``kind`` is ``none``, ``l2`` or ``ewc``.

    Without a ``fisher`` every term weighs 1 (an EWC pull whose parent has no Fisher and no replay
    data to estimate one is an L2 pull)."""

    kind: str = "none"
    strength: float = 0.0
    anchor: Factors = field(default_factory=dict)
    fisher: Factors | None = None

    def penalty(self, weights: AdapterWeights) -> torch.Tensor | float:
        """The term added to a step's loss (0.0 when there is no pull)."""
        if self.kind == "none" or self.strength == 0:
            return 0.0
        total = 0.0
        for module, (a, b) in weights.factors.items():
            a0, b0 = self.anchor[module]
            if self.fisher is None:
                total = total + ((a - a0) ** 2).sum() + ((b - b0) ** 2).sum()
            else:
                fa, fb = self.fisher[module]
                total = total + (fa * (a - a0) ** 2).sum() + (fb * (b - b0) ** 2).sum()
        return self.strength * total


def fisher_by_module(stored: Mapping[str, torch.Tensor], modules: Sequence[str],
                     device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A stored (PEFT-keyed) Fisher as ``module -> (F_A, F_B)`` for ``modules``, float32 on ``device``
    (where the trained factors are)."""
    return {m: (stored[lora_key(m, "A")].to(device, torch.float32), stored[lora_key(m, "B")].to(device, torch.float32))
            for m in modules}


def estimate_fisher(model: torch.nn.Module, runtime: LoraRuntime, weights: AdapterWeights, pool: Sequence[Example], *,
                    samples: int, seed: int, pad_id: int, below: Sequence[AdapterWeights] = ()) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``weights``' LoRA factors, normalized to mean 1, over a seeded
    sample of up to ``samples`` examples of ``pool``, one at a time; PEFT-keyed, ready to store."""
    rng = random.Random(seed + 7)
    sample = rng.sample(list(pool), min(samples, len(pool)))
    device = next(model.parameters()).device
    params = {m: (a.detach().to(device, torch.float32, copy=True).requires_grad_(True),
                  b.detach().to(device, torch.float32, copy=True).requires_grad_(True)) for m, (a, b) in weights.factors.items()}
    acc = {m: (torch.zeros_like(a), torch.zeros_like(b)) for m, (a, b) in params.items()}
    probe = AdapterWeights(params, weights.scale, 0.0)
    model.eval()
    with runtime.activate([Activation(w.to(device)) for w in below] + [Activation(probe)]):
        for example in sample:
            batch = collate([example], pad_id)
            total, n = loss_sum(model, batch)
            grads = torch.autograd.grad(total / max(n, 1), [p for pair in params.values() for p in pair])
            for i, m in enumerate(params):
                acc[m][0].add_(grads[2 * i] ** 2)
                acc[m][1].add_(grads[2 * i + 1] ** 2)
    mean = torch.cat([t.flatten() for pair in acc.values() for t in pair]).mean().clamp_min(1e-30)
    return peft_tensors({m: ((fa / mean).cpu(), (fb / mean).cpu()) for m, (fa, fb) in acc.items()})
