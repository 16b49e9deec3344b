"""How replay and regularization trade new learning against forgetting: the data behind the defaults.

The three sequential updates of `benchmarks/update.py` (alice.jsonl, alice-2.jsonl, alice-3.jsonl,
2 epochs, 15% held out, seed 0) with persona only, once per setting. For each: held-out loss on
each update's new data, the rise of the loss on update 1's held-out data from after update 1 to
after update 3 (forgetting), where the gate put each version, and the wall time of the updates.

    python benchmarks/update_sweep.py            # ~10 min on 2 CPU cores
    python benchmarks/update_sweep.py --quick    # tiny random model: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, workspace  # noqa: E402
from update import EXAMPLES, FILES, persona_updates  # noqa: E402

from persona import LoraSettings, Store, load_base  # noqa: E402
from persona.interactions import read_interactions  # noqa: E402
from persona.lora_runtime import AdapterWeights  # noqa: E402
from persona.training.trainer import Trainer, UpdateConfig, split_holdout  # noqa: E402

SETTINGS = [
    ("defaults (replay 0.5, reg none, precision auto)", {}),
    ("defaults, fp32", {"precision": "fp32"}),
    ("no replay", {"replay_fraction": 0.0}),
    ("replay 0.25", {"replay_fraction": 0.25}),
    ("replay 0.5, l2 0.1", {"reg": "l2", "reg_strength": 0.1}),
    ("replay 0.5, l2 1.0", {"reg": "l2", "reg_strength": 1.0}),
    ("replay 0.5, ewc 0.1", {"reg": "ewc", "reg_strength": 0.1}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 epoch: checks the script runs")
    args = parser.parse_args()
    header("persona update sweep" + (" (QUICK: tiny random model, numbers meaningless)" if args.quick else ""))
    with workspace("sweep", args.quick) as (work, base_id):
        run(work, base_id, 1 if args.quick else 2)


def run(work: Path, base_id: str, epochs: int) -> None:
    base_cfg = UpdateConfig(epochs=epochs, holdout_fraction=0.15, seed=0)
    data = [read_interactions(EXAMPLES / f) for f in FILES]
    base = load_base(base_id)
    store = Store.init(work / "store", base=base_id)
    trainer = Trainer(store, base)
    held = [trainer.tokenize(split_holdout(d, base_cfg.holdout_fraction, base_cfg.seed)[1]).examples for d in data]

    def loss(ref, version, k):
        loaded = store.load(f"{ref}@v{version}")
        return trainer.loss(held[k], AdapterWeights.from_peft(loaded.tensors, loaded.config))[0]

    rows = []
    for i, (label, change) in enumerate(SETTINGS):
        ref = f"user:sweep-{i}"
        store.create(ref, LoraSettings(rank=8, alpha=16))
        started = time.perf_counter()
        versions, gates = persona_updates(trainer, ref, data, dataclasses.replace(base_cfg, **change))
        seconds = time.perf_counter() - started
        rise = loss(ref, versions[-1], 0) - loss(ref, versions[0], 0)
        rows.append([label, *(loss(ref, versions[k], k) for k in range(len(data))), rise, ", ".join(gates), seconds])
        print(f"  done: {label}", file=sys.stderr, flush=True)
    print(table(["setting", *(f"update {k + 1} held-out loss" for k in range(len(data))),
                 "forgetting (rise on update 1's held-out)", "gate", "seconds"], rows))


if __name__ == "__main__":
    main()
