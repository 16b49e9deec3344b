"""Materialized-merge benchmark: what serving a stack to a one-LoRA-per-request engine (vLLM) costs.

On the embedded base (SmolLM2-135M-Instruct), with adapters of the default shape (rank 8, every linear
layer of every block, random factors):

1. **cold build**: ``materialize(store, STACK)`` with no cached entry: pin, load the parts
   (hash-checked), check them, cat-merge, write the folder atomically (fsync), for a 2-part and a
   3-part stack and a layered adapter (``user:carol``, served with its layer: 2 parts).
2. **cached reuse**: the same call again: pin, content key, re-hash the cached folder.
3. for comparison: the plain version folder check (``Store.version_folder``, what a single adapter
   costs the resolver) and the same cat merge through PEFT's ``add_weighted_adapter`` on a meta-device
   skeleton of the base (what ``compose/merge.py`` ran before; it allocates the whole base).
4. **exactness**: max abs(logits(materialized) - logits(stack)) on a 16-token prompt, persona's runtime,
   beside float32's own floor (the same stack summed in reverse order) and relative to the largest
   logit (the tests check 1e-5 absolute on the tiny model; on the 30-layer base float32 rounding alone
   moves logits of magnitude ~20 by a few 1e-5).

    python benchmarks/materialize.py            # ~1 min on 2 idle CPU cores
    python benchmarks/materialize.py --quick    # smoke run on a tiny random model (seconds, numbers meaningless)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, median, table, timed, workspace  # noqa: E402

import json  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from persona import LoraSettings, Store, load_base  # noqa: E402
from persona.compose.materialize import materialize  # noqa: E402
from persona.compose.merge import _peft_merge, plan_merge  # noqa: E402
from persona.lora_runtime import Activation, AdapterWeights, LoraRuntime  # noqa: E402

STACKS = [  # (label, model string)
    ("2-part stack", "user:alice+domain:finance*0.5"),
    ("3-part stack", "user:alice+domain:finance*0.5+domain:legal*0.5"),
    ("layered adapter (2 parts)", "user:carol"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat: checks the script runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    args = parser.parse_args(argv)
    header("persona materialized-merge benchmark" + (" (QUICK: tiny random model, numbers meaningless)" if args.quick else ""))
    with workspace("materialize", args.quick) as (work, base_id):
        run(work, base_id, 1 if args.quick else args.repeats)


def run(work: Path, base_id: str, repeats: int) -> None:
    store = Store.init(work / "store", base=base_id)
    for i, ref in enumerate(["user:alice", "domain:finance", "domain:legal"]):
        store.create(ref, LoraSettings(init="random", seed=i))
    store.create("user:carol", LoraSettings(init="random", seed=3), over="domain:finance")
    rank = store.version_info("user:alice").lora["rank"]
    size = sum(p.stat().st_size for p in store.version_folder("user:alice").iterdir())
    print(f"adapters: rank {rank}, {len(store.load('user:alice').tensors) // 2} modules each, "
          f"{size / 1e6:.2f} MB per version folder; median of {repeats} runs\n")

    rows, exact = [], []
    for label, model in STACKS:
        cold, warm, peft = [], [], []
        for _ in range(repeats):
            shutil.rmtree(store.cache_dir("merges"), ignore_errors=True)
            with timed(cold):
                built = materialize(store, model)
            assert built.built
        for _ in range(max(repeats, 5)):
            with timed(warm):
                again = materialize(store, model)
            assert not again.built and again.path == built.path
        parts = store.pin_stack(model)
        plan = plan_merge(store, [p.ref for p in parts], "merged:bench", "cat", [p.weight for p in parts])
        loaded = [store.load(p.ref) for p in parts]
        for _ in range(repeats):
            with timed(peft):
                _peft_merge(store, plan, loaded)
        mb = sum(p.stat().st_size for p in built.path.iterdir()) / 1e6
        rows.append([label, len(parts), f"{median(cold) * 1e3:.0f} ms", f"{median(warm) * 1e3:.1f} ms",
                     f"{median(peft) * 1e3:.0f} ms", f"{mb:.2f} MB"])
        exact.append((label, model))
    plain = []
    for _ in range(max(repeats, 5)):
        with timed(plain):
            store.version_folder("user:alice")
    print(table(["model", "parts", "cold build", "cached reuse", "PEFT add_weighted_adapter (old path)", "folder"],
                rows))
    print(f"\nplain version folder, hash-checked (one adapter at weight 1): {median(plain) * 1e3:.1f} ms\n")

    base = load_base(base_id)
    runtime = LoraRuntime.attach(base.model)
    ids = torch.tensor([base.tokenizer("The quarterly report shows that revenue grew by", add_special_tokens=False)
                        ["input_ids"][:16]])

    def logits(activations):
        with torch.no_grad(), runtime.activate(activations):
            return base.model(ids).logits

    def weights(tensors, config):
        return AdapterWeights.from_peft(tensors, config)

    checks = []
    for label, model in exact:
        path = materialize(store, model).path
        parts = store.pin_stack(model)
        stack = [Activation(weights(store.load(p.ref).tensors, store.load(p.ref).config), weight=p.weight) for p in parts]
        merged = weights(load_file(str(path / "adapter_model.safetensors")),
                         json.loads((path / "adapter_config.json").read_text()))
        want, got = logits(stack), logits([Activation(merged)])
        floor = float((logits(stack[::-1]) - want).abs().max())  # same sum, other order: float32's own noise
        scale = float(want.abs().max())
        diff = float((got - want).abs().max())
        checks.append([label, f"{float((want - logits([])).abs().max()):.3g}", f"{scale:.3g}", f"{diff:.2e}",
                       f"{floor:.2e}", f"{diff / scale:.1e}", "PASS" if diff / scale < 1e-5 else "FAIL"])
    print(table(["model", "stack's effect: max abs(stack - base)", "max abs logit", "max abs(materialized - stack)",
                 "float32 floor: stack in reverse order", "relative", "goal < 1e-5 relative"], checks))

if __name__ == "__main__":
    main()
