"""Where resident adapters live while serving: slot tensors, LRU residency and a CPU tier.

``SlotBank`` holds, for every wrapped module that some resident adapter targets, one A tensor
``[slots, r_max, in]`` and one B tensor ``[slots, out, r_max]`` with the LoRA scale folded into B
(S-LoRA's unified adapter memory, Punica's gather). Slot 0 is all zeros and means "no adapter".
Loading an adapter copies its factors into a slot (``copy_``); modules are never rebuilt. Adapters
of lower rank are zero-padded, which changes no result. The slot tensors grow one slot at a time,
so N resident adapters cost about N + 1 adapters of memory, not ``max_resident``.

``AdapterCache`` decides which adapter versions are resident: least recently used slots are
evicted; a CPU tier of decoded factors (``AdapterWeights``) sits between the slots and the store, so
an adapter evicted a moment ago comes back without reading, hashing and parsing its file again. When
the slots themselves are in CPU memory the tiers are exclusive (an adapter is in one or the other),
so no adapter is held twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import CapacityExceeded
from ..lora_runtime import AdapterWeights, LoraRuntime, SlotRoute
from ..refs import AdapterRef, StackPart


def weights_nbytes(weights: AdapterWeights) -> int:
    return sum(a.nbytes + b.nbytes for a, b in weights.factors.values())


def _rank(weights: AdapterWeights) -> int:
    return max((a.shape[0] for a, _ in weights.factors.values()), default=0)


class SlotBank:
    """Per-module slot tensors of the adapters resident on the engine's device."""

    def __init__(self, runtime: LoraRuntime, *, device: torch.device, dtype: torch.dtype):
        self.runtime = runtime
        self.device = device
        self.dtype = dtype
        self.capacity = 1  # slot 0, the zero adapter
        self.rank = 0
        self.a: dict[str, torch.Tensor] = {}  # module -> [capacity, rank, in]
        self.b: dict[str, torch.Tensor] = {}  # module -> [capacity, out, rank]
        self._targets: dict[int, tuple[frozenset[str], int]] = {}  # slot -> (modules, rank) of its adapter

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.a.values()) + sum(t.nbytes for t in self.b.values())

    @property
    def slot_nbytes(self) -> int:
        """Memory of one slot across every module (what one more resident adapter costs)."""
        return self.nbytes // self.capacity

    def grow(self, capacity: int, rank: int | None = None) -> None:
        """Reallocate every slot tensor to ``capacity`` slots and rank ``rank`` (never shrinks)."""
        capacity, rank = max(capacity, self.capacity), max(rank or 0, self.rank)
        if (capacity, rank) == (self.capacity, self.rank):
            return
        for name in list(self.a):
            a = self._zeros_a(name, capacity, rank)
            b = self._zeros_b(name, capacity, rank)
            a[: self.capacity, : self.rank].copy_(self.a[name])
            b[: self.capacity, :, : self.rank].copy_(self.b[name])
            self.a[name], self.b[name] = a, b
        self.capacity, self.rank = capacity, rank

    def _zeros_a(self, name: str, capacity: int, rank: int) -> torch.Tensor:
        return torch.zeros(capacity, rank, self.runtime.modules[name].in_features, device=self.device, dtype=self.dtype)

    def _zeros_b(self, name: str, capacity: int, rank: int) -> torch.Tensor:
        out = self.runtime.modules[name].out_features
        return torch.zeros(capacity, out, rank, device=self.device, dtype=self.dtype)

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into ``slot``, folding its scale into B; its untargeted modules there become zero."""
        if not 1 <= slot < self.capacity:
            raise IndexError(f"slot {slot} is not a loadable slot (capacity {self.capacity})")
        rank = _rank(weights)
        self.grow(self.capacity, rank)
        for name in weights.factors:
            if name not in self.a:  # first adapter to target this module: its slot tensors start now
                self.a[name] = self._zeros_a(name, self.capacity, self.rank)
                self.b[name] = self._zeros_b(name, self.capacity, self.rank)
        scale = weights.scale
        for name, a_slots in self.a.items():
            b_slots = self.b[name]
            factors = weights.factors.get(name)
            if factors is None:
                a_slots[slot].zero_()
                b_slots[slot].zero_()
                continue
            a, b = factors
            r = a.shape[0]
            a_slots[slot, :r].copy_(a)
            if scale == 1.0:
                b_slots[slot, :, :r].copy_(b)
            elif self.dtype == b.dtype == torch.float32 and b.device == self.device:
                torch.mul(b, scale, out=b_slots[slot, :, :r])  # one pass, no temporary the size of B
            else:  # fold in float32, round once into the slot dtype
                b_slots[slot, :, :r].copy_(b.to(torch.float32) * scale)
            if r < self.rank:  # zero padding: exact, since padded ranks contribute 0
                a_slots[slot, r:].zero_()
                b_slots[slot, :, r:].zero_()
        self._targets[slot] = (frozenset(weights.factors), rank)

    def read(self, slot: int) -> AdapterWeights:
        """Copy an adapter back out of its slot (to CPU memory), exactly as it was written."""
        modules, rank = self._targets[slot]
        factors = {
            m: (self.a[m][slot, :rank].to("cpu", copy=True), self.b[m][slot, :, :rank].to("cpu", copy=True))
            for m in sorted(modules)
        }
        return AdapterWeights(factors=factors, scale=1.0)

    def release(self, slot: int) -> None:
        """Forget which adapter ``slot`` held; its memory is overwritten by the next write."""
        self._targets.pop(slot, None)

    def routes(
        self, slot_rows: torch.Tensor, row_scale: torch.Tensor | None = None, *, pregather: bool = False
    ) -> dict[str, list[SlotRoute]]:
        """Routes for a batch: ``slot_rows[d, i]`` is the slot row i reads at stack depth d.

        ``row_scale`` (same shape, optional) weights each part of each row (a stack part's
        ``*W``); a depth whose weights are all 1 is routed exactly as without them. Depths where every row
        reads slot 0, and modules that none of a depth's adapters targets, are skipped. With
        ``pregather`` the rows' factors are gathered once here (memory: one adapter per row, held
        while the routes are) instead of at every forward: a decode loop reads them once per step
        instead of gathering, writing and reading them again.
        """
        routes: dict[str, list[SlotRoute]] = {name: [] for name in self.a}
        slot_rows = slot_rows.to("cpu")
        for depth in range(slot_rows.shape[0]):
            row_slots = slot_rows[depth]
            distinct = {int(s) for s in row_slots.tolist()}
            used = sorted(distinct - {0})
            if not used:
                continue
            scale = row_scale[depth] if row_scale is not None else None
            if scale is not None and bool((scale == 1).all()):
                scale = None  # an unweighted depth takes the unweighted path, bit for bit
            scale_arg: torch.Tensor | float | None = None
            if len(distinct) == 1:  # one adapter on every row: no gather
                rows: torch.Tensor | int = used[0]
                if scale is not None and bool((scale == scale[0]).all()):
                    scale_arg = float(scale[0])
                elif scale is not None:  # the same adapter at different weights: still no gather
                    scale_arg = scale.to(device=self.device, dtype=self.dtype).view(-1, 1, 1)
            else:
                rows = row_slots.to(self.device)
                if scale is not None:
                    scale_arg = scale.to(device=self.device, dtype=self.dtype).view(-1, 1, 1)
            targeted = set().union(*(self._targets[s][0] for s in used))
            for name in targeted:
                if pregather and not isinstance(rows, int):
                    a, b = self.a[name].index_select(0, rows), self.b[name].index_select(0, rows)
                    route = SlotRoute(a, b, None, scale_arg)
                else:
                    route = SlotRoute(self.a[name], self.b[name], rows, scale_arg)
                routes[name].append(route)
        return {name: r for name, r in routes.items() if r}


@dataclass(frozen=True)
class CacheCounters:
    loads: int
    cpu_hits: int
    resident_hits: int
    evictions: int


class AdapterCache:
    """Which pinned adapter versions are resident, and where the others come from.

    Keys are pinned references (``user:alice@v3``): versions are immutable, so an entry never goes
    stale, and a moved alias simply names another key.
    """

    def __init__(
        self,
        store,
        bank: SlotBank,
        *,
        max_resident: int,
        cpu_cache: int,
    ):
        self.store = store
        self.bank = bank
        self.max_resident = max_resident
        self.cpu_cache = cpu_cache
        # On a CPU device a CPU-tier copy of a resident adapter would duplicate its slot: keep tiers exclusive.
        self.exclusive = bank.device.type == "cpu"
        self.resident: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self.cpu: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._free: list[int] = []
        # Keys running rows read (continuous batching): between two steps other work may load adapters,
        # and these are never evicted for it.
        self.pinned: frozenset[str] = frozenset()
        self.loads = self.cpu_hits = self.resident_hits = self.evictions = 0

    @property
    def cpu_nbytes(self) -> int:
        return sum(weights_nbytes(w) for w in self.cpu.values())

    def counters(self) -> CacheCounters:
        return CacheCounters(self.loads, self.cpu_hits, self.resident_hits, self.evictions)

    def acquire(self, ref: AdapterRef, protected: Iterable[str] = ()) -> int:
        """The slot holding pinned ``ref``, loading it if needed; never evicts a ``protected`` key."""
        key = str(ref)
        if key in self.resident:
            self.resident.move_to_end(key)
            self.resident_hits += 1
            return self.resident[key]
        weights = self._fetch(ref)
        slot = self._free_slot(set(protected) | {key})
        try:
            self.bank.write(slot, weights)
        except BaseException:
            self._free.append(slot)
            raise
        self.resident[key] = slot
        if self.exclusive:
            self.cpu.pop(key, None)
        return slot

    def acquire_each(self, refs: Sequence[AdapterRef], protected: Iterable[str] = ()) -> dict[str, BaseException]:
        """Make every one of ``refs`` resident (none evicts another, nor a ``protected`` key), each on
        its own: returns the error of each that failed (a damaged file), by key, for its requests only."""
        protected = set(protected) | {str(r) for r in refs}
        broken: dict[str, BaseException] = {}
        for ref in refs:
            try:
                self.acquire(ref, protected)
            except Exception as exc:  # noqa: BLE001 - handed to the requests that need this adapter
                broken[str(ref)] = exc
        return broken

    def _fetch(self, ref: AdapterRef) -> AdapterWeights:
        key = str(ref)
        if key in self.cpu:
            self.cpu_hits += 1
            self.cpu.move_to_end(key)
            return self.cpu[key]
        loaded = self.store.load(ref)  # hash-checked safetensors
        weights = AdapterWeights.from_peft(loaded.tensors, loaded.config, dtype=torch.float32)
        self.bank.runtime.check(weights)
        self.loads += 1
        if not self.exclusive:
            self._remember(key, weights)
        return weights

    def _remember(self, key: str, weights: AdapterWeights) -> None:
        if self.cpu_cache <= 0:
            return
        self.cpu[key] = weights
        self.cpu.move_to_end(key)
        while len(self.cpu) > self.cpu_cache:
            self.cpu.popitem(last=False)

    def _free_slot(self, protected: set[str]) -> int:
        if self._free:
            return self._free.pop()
        if len(self.resident) < self.max_resident:
            self.bank.grow(self.bank.capacity + 1)
            return self.bank.capacity - 1
        for key in self.resident:  # least recently used first
            if key not in protected and key not in self.pinned:
                self.evict(key)
                return self._free.pop()
        raise CapacityExceeded(
            f"a batch needs more than max_resident={self.max_resident} adapters at once; raise max_resident"
        )

    def evict(self, key: str) -> None:
        slot = self.resident.pop(key)
        if self.exclusive and self.cpu_cache > 0:
            self._remember(key, self.bank.read(slot))
        self.bank.release(slot)
        self._free.append(slot)
        self.evictions += 1

    def slots_for(self, refs_per_row: Sequence[Sequence[AdapterRef]], protected: Iterable[str] = ()) -> torch.Tensor:
        """``[depth, rows]`` slot indices for rows of (already resident) pinned stacks; 0 pads short stacks."""
        depth = max((len(r) for r in refs_per_row), default=0)
        table = torch.zeros(max(depth, 1), len(refs_per_row), dtype=torch.long)
        for i, refs in enumerate(refs_per_row):
            for d, ref in enumerate(refs):
                table[d, i] = self.resident[str(ref)]
        return table


def distinct_keys(refs_per_row: Iterable[Sequence[AdapterRef]]) -> list[AdapterRef]:
    seen: dict[str, AdapterRef] = {}
    for refs in refs_per_row:
        for ref in refs:
            seen.setdefault(str(ref), ref)
    return list(seen.values())


def group_rows(refs_per_row: Sequence[Sequence[AdapterRef]], limit: int) -> list[list[int]]:
    """Split rows, in order, into groups that each need at most ``limit`` distinct adapters."""
    groups: list[list[int]] = []
    current: list[int] = []
    keys: set[str] = set()
    for i, refs in enumerate(refs_per_row):
        row_keys = {str(r) for r in refs}
        if current and len(keys | row_keys) > limit:
            groups.append(current)
            current, keys = [], set()
        current.append(i)
        keys |= row_keys
    if current:
        groups.append(current)
    return groups


def weight_table(parts_per_row: Sequence[Sequence[StackPart]], shape: torch.Size) -> torch.Tensor | None:
    """``[depth, rows]`` weights of the rows' parts (1 where a stack is shorter); None when all are 1."""
    if all(p.weight == 1.0 for parts in parts_per_row for p in parts):
        return None
    table = torch.ones(shape, dtype=torch.float32)
    for i, parts in enumerate(parts_per_row):
        for d, part in enumerate(parts):
            table[d, i] = part.weight
    return table
