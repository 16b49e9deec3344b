"""One LoRA training step on the embedded base, by LoRA dropout implementation and precision.

A batch of 8 chats from examples/interactions/alice.jsonl (padded to its longest row), a fresh
rank-8 adapter on every linear layer, AdamW; forward, backward and optimizer step timed, median
of interleaved repeats after a warm-up. Rows:

- ``nn.functional.dropout`` (PEFT's way: a Bernoulli draw per element), fp32;
- persona's LoRA dropout (mask from 16-bit random integers), fp32;
- no dropout, fp32 (the floor dropout can approach);
- persona's LoRA dropout under bf16 autocast (what ``--precision auto`` picks on AVX512-BF16/AMX).

    python benchmarks/train_step.py            # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table  # noqa: E402

import torch  # noqa: E402

import persona.lora_runtime as layers  # noqa: E402
from persona import EMBEDDED_BASE, LoraSettings, Store, load_base  # noqa: E402
from persona.interactions import read_interactions  # noqa: E402
from persona.training.batches import collate  # noqa: E402
from persona.lora_runtime import Activation, AdapterWeights  # noqa: E402
from persona.training.evaluate import loss_sum  # noqa: E402
from persona.training.trainer import Trainer  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    header("persona training step")
    with tempfile.TemporaryDirectory(prefix="persona-bench-step-") as work:
        store = Store.init(Path(work) / "store", base=EMBEDDED_BASE)
        store.create("user:a", LoraSettings(rank=8, alpha=16, dropout=0.05))
        trainer = Trainer(store, load_base(EMBEDDED_BASE))
        loaded = store.load("user:a")
        start = AdapterWeights.from_peft(loaded.tensors, loaded.config)
        params = {m: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for m, (a, b) in start.factors.items()}
        optimizer = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=1e-3)
        examples = trainer.tokenize(read_interactions(EXAMPLES / "alice.jsonl")).examples[:8]
        batch = collate(examples, trainer.pad_id)
        persona_dropout = layers._dropout

        def torch_dropout(x, p):
            return torch.nn.functional.dropout(x, p, training=True)

        variants = {
            "nn.functional.dropout, fp32": (torch_dropout, 0.05, False),
            "persona dropout, fp32": (persona_dropout, 0.05, False),
            "no dropout, fp32": (persona_dropout, 0.0, False),
            "persona dropout, bf16 autocast": (persona_dropout, 0.05, True),
        }

        def step(dropout_fn, p, bf16) -> float:
            layers._dropout = dropout_fn
            weights = AdapterWeights(params, start.scale, p)
            with trainer.runtime.activate([Activation(weights)]):
                began = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    summed, n = loss_sum(trainer.model, batch)
                optimizer.zero_grad(set_to_none=True)
                (summed / n).backward()
                optimizer.step()
                return time.perf_counter() - began

        trainer.model.train()
        times: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for repeat in range(args.repeats + 1):
                for name, variant in variants.items():
                    elapsed = step(*variant)
                    if repeat:  # the first round warms up
                        times[name].append(elapsed)
        finally:
            layers._dropout = persona_dropout
        reference = statistics.median(times["nn.functional.dropout, fp32"])
        print(f"batch {tuple(batch.input_ids.shape)}, {batch.num_tokens} real tokens\n")
        print(table(["variant", "step (s, median)", "speed vs nn.functional.dropout fp32"],
                    [[name, statistics.median(t), reference / statistics.median(t)] for name, t in times.items()]))


if __name__ == "__main__":
    main()
