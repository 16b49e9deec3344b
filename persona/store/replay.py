"""Per-adapter replay buffer (rehearsal against forgetting) and pending-interaction queue.

The replay buffer is a reservoir sample (Vitter's algorithm R) of every interaction an adapter has
been trained on: bounded in size, each past interaction equally likely to be kept, oldest first. It lives beside
the adapter's versions (``replay.jsonl`` plus ``replay.state.json`` holding how many interactions
the reservoir has seen) and is only ever read for that adapter. Both files are rewritten atomically.

Both hold a person's interactions: they are created with mode 0600 (never widened afterwards). The
pending queue of interactions logged for the next update is :mod:`persona.pending`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..interactions import Interaction, parse_interactions
from .._fs import PRIVATE_MODE, atomic_write_bytes, atomic_write_json, read_regular_file

REPLAY = "replay.jsonl"
REPLAY_STATE = "replay.state.json"


def _to_line(i: Interaction) -> str:
    return json.dumps(i.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ReplayBuffer:
    """The reservoir of one adapter: ``items`` kept, out of ``seen`` ever offered."""

    items: tuple[Interaction, ...]
    seen: int

    @classmethod
    def read(cls, folder: Path) -> "ReplayBuffer":
        path = folder / REPLAY
        try:  # never through a symlink: a planted link would feed another file into rehearsal
            raw = read_regular_file(path).decode("utf-8")
        except FileNotFoundError:
            return cls((), 0)
        # Split on "\n" only: lines are JSON written with ensure_ascii=False, whose strings may hold
        # U+2028 and other characters that str.splitlines would split a row on.
        items = tuple(parse_interactions(raw.split("\n"), source=str(path)))
        try:
            seen = int(json.loads(read_regular_file(folder / REPLAY_STATE))["seen"])
        except (OSError, ValueError, KeyError, TypeError):
            seen = len(items)
        return cls(items, max(seen, len(items)))

    def offer(self, new: Sequence[Interaction], capacity: int, seed: int) -> "ReplayBuffer":
        """Algorithm R: each of the ``seen + len(new)`` interactions ends up kept with equal probability."""
        rng = random.Random(seed * 1_000_003 + self.seen)
        items = list(self.items)
        seen = self.seen
        for interaction in new:
            seen += 1
            if len(items) < capacity:
                items.append(interaction)
            else:
                j = rng.randrange(seen)
                if j < capacity:
                    # The newcomer goes last, not into slot j: the buffer stays oldest-first, which
                    # recency-weighted replay (UpdateConfig.replay_recency) reads as age.
                    del items[j]
                    items.append(interaction)
        return ReplayBuffer(tuple(items[:capacity]), seen)

    def write(self, folder: Path) -> None:
        body = "".join(_to_line(i) + "\n" for i in self.items)
        atomic_write_bytes(folder / REPLAY, body.encode("utf-8"), PRIVATE_MODE)
        atomic_write_json(folder / REPLAY_STATE, {"seen": self.seen, "size": len(self.items)}, PRIVATE_MODE)

