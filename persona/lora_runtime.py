"""LoRA applied at run time: the base's target ``nn.Linear`` modules are wrapped once, and each
wrapper adds the low-rank updates of whichever adapters are active, for the rows they apply to.

The base's own weights are never touched: with no adapter active a wrapper returns exactly
``base(x)``, bit for bit. Training and serving use the same wrappers, so what is trained is what is
served. An adapter is a set of ``(A, B)`` pairs keyed by module name plus one scale (alpha / r);
several may be active on one forward, each on all rows or on a subset of rows (mixed batches and
stacks).

Multi-adapter training adds *row blocks*: rows ``start:stop`` of a batch train one adapter, the
next block another, each block with its own trainable factors (leaf tensors, so each adapter's
gradient comes only from its own rows) and its own dropout stream (:class:`RowBlock`).

Serving adds a third path, *routes* (S-LoRA / Punica's idea): the engine keeps every resident
adapter in preallocated per-module slot tensors, and a route says which slot each row of the batch
reads. The wrapper then gathers the rows' factors and applies them with two batched matmuls, so a
batch mixing eight adapters costs about what a batch of one adapter costs (no loop over adapters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import InvalidConfig, UnsupportedAdapter
from .peft_format import PeftConfig, group_factors, peft_tensors, refuse_variants


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's LoRA factors by module name, ready to apply."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    scale: float
    dropout: float = 0.0

    @classmethod
    def from_peft(cls, tensors: Mapping[str, torch.Tensor], config: PeftConfig | Mapping[str, Any], *,
                  dtype=torch.float32) -> "AdapterWeights":
        """Build from PEFT-format tensors and ``adapter_config.json`` (typed, or its JSON mapping);
        refuse variants we do not compute."""
        config = PeftConfig.of(config)
        refuse_variants(config, UnsupportedAdapter, "adapter", "which persona does not support")
        factors = group_factors(tensors, lambda key: UnsupportedAdapter(f"unexpected tensor {key!r} in a LoRA adapter"))
        missing = [m for m, (a, b) in factors.items() if a is None or b is None]
        if missing:
            raise UnsupportedAdapter(f"adapter has an A without a B (or the reverse) for {missing[0]}")
        return cls(
            factors={m: (a.to(dtype), b.to(dtype)) for m, (a, b) in factors.items()},
            scale=config.scaling,
            dropout=config.lora_dropout,
        )

    def to_peft(self) -> dict[str, torch.Tensor]:
        """The factors as PEFT-keyed tensors (CPU copies, wherever the factors were), ready to store."""
        return peft_tensors({m: (a.detach().to("cpu", copy=True), b.detach().to("cpu", copy=True))
                             for m, (a, b) in self.factors.items()})

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "AdapterWeights":
        """The same adapter with its factors on ``device`` in ``dtype`` (float32 by default: factors
        are kept in float32 even over a bfloat16 base); ``self`` when they already are."""
        if all(a.device == torch.device(device) and a.dtype == dtype and b.device == a.device and b.dtype == dtype
               for a, b in self.factors.values()):
            return self
        factors = {m: (a.to(device, dtype), b.to(device, dtype)) for m, (a, b) in self.factors.items()}
        return AdapterWeights(factors, self.scale, self.dropout)


@dataclass(frozen=True)
class SlotRoute:
    """One layer of adapters routed per row from slot tensors (inference only).

    ``a_slots`` is ``[slots, r, in]`` and ``b_slots`` ``[slots, out, r]`` with the LoRA scale
    already folded into B; slot 0 holds zeros (no adapter). ``rows`` is the slot of every row of the
    batch (a LongTensor ``[batch]``, gathered at each forward), one int when every row reads the same
    slot (no gather), or None when the tensors are already gathered, one entry per row.
    ``row_scale``, when given, multiplies each row's update (``[batch, 1, 1]``, or a float when
    every row has the same weight): per-part weights of a stack (``domain:finance*0.5``).
    """

    a_slots: torch.Tensor
    b_slots: torch.Tensor
    rows: torch.Tensor | int | None
    row_scale: torch.Tensor | float | None = None


@dataclass(frozen=True)
class Activation:
    """An adapter active on a forward: on every row (``rows=None``) or on the given row indices.

    ``generator`` draws its dropout masks (training, ``rows=None`` only): None is torch's global one."""

    weights: AdapterWeights
    rows: torch.Tensor | None = None
    weight: float = 1.0
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class RowBlock:
    """An adapter applied to the contiguous rows ``start:stop`` of a batch (multi-adapter training).

    The blocks of one forward partition the batch, in order. Each draws its dropout masks from its
    own ``generator`` at its own padded ``length`` (its rows' longest, as if it were alone in the
    batch; positions after it are padding and keep their input), so an adapter trained beside
    others sees the very masks it would see alone, whatever shares its batch.
    """

    weights: AdapterWeights
    start: int
    stop: int
    length: int | None = None
    generator: torch.Generator | None = None


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the LoRA deltas of the active adapters."""

    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.active: tuple[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, float, float, Any], ...] = ()
        self.blocks: tuple[tuple[int, int, torch.Tensor | None, torch.Tensor | None, float, float, int | None, Any], ...] = ()
        self.routes: tuple[SlotRoute, ...] = ()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype checks)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for rows, a, b, scale, dropout, generator in self.active:
            if rows is None:
                h = _dropout(x, dropout, generator) if dropout and self.training else x
                y = _lora_add(y, h, a, b, scale)
            else:
                delta = (x.index_select(0, rows).to(a.dtype) @ a.t() @ b.t()) * scale
                y = y.index_add(0, rows, delta.to(y.dtype))
        if self.blocks:
            if self.blocks[-1][1] != y.shape[0]:
                raise RuntimeError(f"row blocks cover {self.blocks[-1][1]} rows of a batch of {y.shape[0]}")
            y = torch.cat([_apply_block(block, x, y, self.training) for block in self.blocks])
        for route in self.routes:
            y = _apply_route(route, x, y)
        return y


def _lora_add(y: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y + scale * (h A^T) B^T``. Factors stay float32 (training quality) even over a 16-bit base: the
    input is raised to the factors' dtype and the update rounded once into y's (autocast, when on, runs
    the products in bf16 itself)."""
    low = h.reshape(-1, h.shape[-1]).to(a.dtype) @ a.t()
    if low.dtype == y.dtype:  # one addmm: no separate pass over y for the scale and the sum
        return torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t(), alpha=scale).view(y.shape)
    return y + ((low @ b.t()) * scale).to(y.dtype).view(*y.shape[:-1], -1)


def _apply_block(block, x: torch.Tensor, y: torch.Tensor, training: bool) -> torch.Tensor:
    """Rows ``start:stop`` of ``y`` plus their adapter's update (unchanged where it has no factors here)."""
    start, stop, a, b, scale, dropout, length, generator = block
    ys = y[start:stop]
    if a is None:
        return ys
    h = x[start:stop]
    if dropout and training:
        if length is None or length >= h.shape[1]:
            h = _dropout(h, dropout, generator)
        else:  # masks drawn at the block's own length, as alone; padding positions after it keep their input
            h = torch.cat([_dropout(h[:, :length], dropout, generator), h[:, length:]], dim=1)
    return _lora_add(ys, h, a, b, scale)


def _dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout whose mask comes from 16-bit random integers, four per int64 draw.

    Same semantics as ``nn.functional.dropout`` (each element zeroed independently, survivors
    scaled by 1/(1-p)), with the drop probability rounded to a multiple of 1/65536. Drawing a
    Bernoulli per element is what makes ``nn.functional.dropout`` costly on a CPU: at LoRA's seven
    inputs per layer it was about a fifth of a training step; this draws a quarter as many numbers.
    """
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device, generator=generator)
    bits = words.view(torch.int16)[:n].view(x.shape)
    return torch.where(bits >= round(p * 65536) - 32768, x * (1.0 / (1.0 - p)), 0.0)


def _apply_route(route: SlotRoute, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(route.rows, int):  # every row reads one slot: plain matmuls on views, no copy
        h = x @ route.a_slots[route.rows].t()
        if isinstance(route.row_scale, torch.Tensor):  # [batch, 1, 1], one weight per row: fit h's rank
            h = h * route.row_scale.view(-1, *([1] * (h.dim() - 1)))
        elif route.row_scale is not None:
            h = h * route.row_scale
        return y + h @ route.b_slots[route.rows].t()
    batch = route.a_slots.shape[0] if route.rows is None else route.rows.shape[0]
    squeeze = x.dim() == 2  # [batch, in]: a model that flattened nothing but the sequence
    if squeeze:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    if x.dim() != 3 or x.shape[0] != batch:
        raise RuntimeError(
            f"routed LoRA expects inputs [batch={batch}, seq, features], got {tuple(x.shape)}: this model "
            "reshapes activations before its linear layers, so per-row adapters cannot be applied"
        )
    if route.rows is None:
        a, b = route.a_slots, route.b_slots
    else:
        a = route.a_slots.index_select(0, route.rows)  # [batch, r, in]
        b = route.b_slots.index_select(0, route.rows)  # [batch, out, r]
    h = torch.bmm(x, a.transpose(1, 2))
    if route.row_scale is not None:
        h = h * route.row_scale
    y = torch.baddbmm(y, h, b.transpose(1, 2))
    return y.squeeze(1) if squeeze else y


class LoraRuntime:
    """The wrapped modules of one base model and the adapters active on it.

    >>> runtime = LoraRuntime.attach(model, ["q_proj", "v_proj"])   # doctest: +SKIP
    >>> with runtime.activate([Activation(weights)]):                # doctest: +SKIP
    ...     logits = model(input_ids).logits
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, AdapterLinear]):
        self.model = model
        self.modules = dict(modules)

    @classmethod
    def attach(cls, model: nn.Module, targets: Iterable[str] | None = None) -> "LoraRuntime":
        """Wrap every ``nn.Linear`` whose last name part is in ``targets`` (None: all but lm_head).

        Idempotent: a model already wrapped returns a runtime over its existing wrappers (and wraps
        any newly requested targets).
        """
        wanted = set(targets) if targets is not None else None
        wrapped: dict[str, AdapterLinear] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLinear):
                wrapped[module.name] = module
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or name.endswith("lm_head") or name.endswith(".base"):
                continue
            if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = AdapterLinear(module, name)
            wrapper.train(module.training)  # a new module starts in training mode; follow the base
            setattr(parent, child, wrapper)
            wrapped[name] = wrapper
        return cls(model, wrapped)

    def check(self, weights: AdapterWeights) -> None:
        for module, (a, b) in weights.factors.items():
            target = self.modules.get(module)
            if target is None:
                raise UnsupportedAdapter(f"adapter targets {module}, which this base has not wrapped or does not have")
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
                raise UnsupportedAdapter(
                    f"adapter shapes for {module} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit the base "
                    f"({target.in_features} -> {target.out_features})"
                )

    def set_active(self, activations: Sequence[Activation]) -> None:
        plans: dict[str, list] = {name: [] for name in self.modules}
        for act in activations:
            self.check(act.weights)
            for module, (a, b) in act.weights.factors.items():
                plans[module].append((act.rows, a, b, act.weights.scale * act.weight, act.weights.dropout,
                                      act.generator))
        for name, module in self.modules.items():
            module.active = tuple(plans[name])

    def set_blocks(self, blocks: Sequence[RowBlock]) -> None:
        """Give each block of rows its own adapter (blocks partition the batch, in order)."""
        stops = [0] + [blk.stop for blk in blocks]
        if any(blk.start != stop or blk.stop <= blk.start for blk, stop in zip(blocks, stops)):
            raise InvalidConfig("row blocks must partition the batch: contiguous, in order, none empty")
        for blk in blocks:
            self.check(blk.weights)
        for name, module in self.modules.items():
            plan = []
            for blk in blocks:
                a, b = blk.weights.factors.get(name, (None, None))
                plan.append((blk.start, blk.stop, a, b, blk.weights.scale, blk.weights.dropout, blk.length, blk.generator))
            # A module no block trains keeps its plain path (no split of the batch and no concatenation).
            module.blocks = tuple(plan) if any(p[2] is not None for p in plan) else ()

    def clear(self) -> None:
        for module in self.modules.values():
            module.active = ()
            module.blocks = ()

    def set_routes(self, routes: Mapping[str, Sequence[SlotRoute]]) -> None:
        """Route rows to slots: ``{module name: routes}``; modules not named get none."""
        unknown = set(routes) - set(self.modules)
        if unknown:
            raise InvalidConfig(f"no wrapped module named {sorted(unknown)[0]}")
        for name, module in self.modules.items():
            module.routes = tuple(routes.get(name, ()))

    def clear_routes(self) -> None:
        for module in self.modules.values():
            module.routes = ()

    def activate(self, activations: Sequence[Activation], blocks: Sequence[RowBlock] = ()):
        """Context manager: the given adapters (and row blocks) are active inside, none after."""
        runtime = self

        class _Active:
            def __enter__(self_inner):
                runtime.set_active(activations)
                try:
                    runtime.set_blocks(blocks)
                except BaseException:
                    runtime.clear()
                    raise
                return runtime

            def __exit__(self_inner, *exc):
                runtime.clear()
                return False

        return _Active()
