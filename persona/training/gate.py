"""The promotion gate: whether an update's new version becomes ``current``, decided from measured losses.

A pure function of four losses and the bounds, so the rule reads (and is tested) on its own:

- the new version must be measured better than its parent on the held-out slice of the new data
  (no held-out data: no evidence, so no promotion);
- its replay loss (what the adapter knew) may rise by at most ``max_forgetting`` relative to the
  parent's or ``forgetting_floor`` nats per token, whichever allows more. A relative bound alone
  fails on a replay loss near zero (docs/TRAINING.md); no replay yet means nothing to forget;
- ``force`` promotes whatever the rule says, and the reason says so.

>>> decide(2.0, 1.5, 1.0, 1.02, max_forgetting=0.05, forgetting_floor=0.05).promoted
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["GateDecision", "decide"]


@dataclass(frozen=True)
class GateDecision:
    """The verdict: ``promoted`` (become ``current``, else ``candidate``), the ``reason`` recorded in
    ``meta.json``, and ``forced`` (the caller asked to promote whatever the rule says)."""

    promoted: bool
    reason: str
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """What ``meta.json`` records under ``metrics.gate``."""
        return {"promoted": self.promoted, "reason": self.reason, "forced": self.forced}


def decide(held_before: float, held_after: float, replay_before: float, replay_after: float, *,
           max_forgetting: float, forgetting_floor: float, force: bool = False) -> GateDecision:
    """Judge an update from the parent's and the new version's mean losses (NaN: nothing measured).

    ``held_*`` are losses on the held-out slice of the new data, ``replay_*`` on the gate's replay
    sample; ``max_forgetting`` is the allowed relative rise, ``forgetting_floor`` the absolute one.
    """
    if math.isnan(held_after):
        verdict, reason = False, "no held-out data to show the new version is better (give more interactions)"
    elif not held_after < held_before:
        verdict, reason = False, f"held-out loss did not improve ({held_before:.4f} -> {held_after:.4f})"
    elif not math.isnan(replay_before) and replay_after - replay_before > max(
            replay_before * max_forgetting, forgetting_floor):
        rise = replay_after / replay_before - 1 if replay_before > 0 else math.inf
        verdict, reason = False, (f"replay loss rose {rise:.1%} ({replay_before:.4f} -> {replay_after:.4f}), "
                                  f"over the {max_forgetting:.1%} bound and the "
                                  f"{forgetting_floor:.3f}-nat floor")
    else:
        forgot = "" if math.isnan(replay_before) else f", replay {replay_before:.4f} -> {replay_after:.4f}"
        verdict, reason = True, f"held-out loss improved {held_before:.4f} -> {held_after:.4f}{forgot}"
    if force and not verdict:
        return GateDecision(True, f"forced: {reason}", forced=True)
    return GateDecision(verdict, reason, forced=force)
