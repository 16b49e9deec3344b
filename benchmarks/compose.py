"""Compose benchmark: routing accuracy and overhead, and what each merge method keeps of its parents.

One run on the embedded base (SmolLM2-135M-Instruct):

1. Train three domain adapters with ``Trainer.update`` on examples/interactions/domain-{finance,
   medicine,cooking}.jsonl, holding out 10 chats per domain (seeded) that nothing trains on.
2. **Routing**: top-1 accuracy on the 30 held-out prompts for both scorers (``centroid``: the base's
   embedding centroid of each domain's training prompts; ``arrow``: prototypes from each adapter's
   weights), the one-off cost of building the router's per-domain state, and the per-request cost
   of ``route()`` against the request it routes (prefill of the chat-templated prompt, and a
   32-token greedy generation, with the chosen adapter active).
3. **Merging**: the three domain adapters merged with every method (weights 1 each: "all three at
   once"; density 0.5; svd re-ranked to the parents' rank 8), and for each parent the loss on its
   held-out chats under the merge relative to the loss under the parent alone (1.0 = nothing lost).
   Three reference rows: the base alone, the three parents stacked at inference (which ``cat``
   must equal), and the weighted stack ``domain:finance*W+domain:medicine*W+domain:cooking*W`` with
   W = 1/3 (which ``cat, weights 1/3 each`` must equal).

    python benchmarks/compose.py            # ~10 min on 2 idle CPU cores
    python benchmarks/compose.py --quick    # smoke run on a tiny random model (seconds, numbers meaningless)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, workspace  # noqa: E402

import torch  # noqa: E402

from persona import LoraSettings, Store, load_base  # noqa: E402
from persona.compose.merge import merge  # noqa: E402
from persona.interactions import read_interactions  # noqa: E402
from persona.lora_runtime import Activation, AdapterWeights  # noqa: E402
from persona.compose.route import Router, prompt_text  # noqa: E402
from persona.training.trainer import Trainer, UpdateConfig, split_holdout  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
DOMAINS = ("finance", "medicine", "cooking")
HELD_OUT = 10
GENERATIONS = 3  # 32-token generations timed per domain
MERGES = [  # (label, method, options)
    ("cat", "cat", {}),
    ("svd (rank 8)", "svd", {"rank": 8}),
    ("linear", "linear", {}),
    ("ties (density 0.5)", "ties", {"density": 0.5}),
    ("dare_linear (density 0.5)", "dare_linear", {"density": 0.5}),
    ("dare_ties (density 0.5)", "dare_ties", {"density": 0.5}),
    ("cat, weights 1/3 each", "cat", {"weights": [1 / 3] * 3}),
    ("linear, weights 1/3 each", "linear", {"weights": [1 / 3] * 3}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 epoch: checks the script runs")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    header("persona compose benchmark" + (" (QUICK: tiny random model, numbers meaningless)" if args.quick else ""))
    with workspace("compose", args.quick) as (work, base_id):
        run(work, base_id, 1 if args.quick else args.epochs)


def weights_of(store: Store, ref: str) -> AdapterWeights:
    loaded = store.load(ref)
    return AdapterWeights.from_peft(loaded.tensors, loaded.config)


def run(work: Path, base_id: str, epochs: int) -> None:
    base = load_base(base_id)
    store = Store.init(work / "store", base=base_id)
    trainer = Trainer(store, base)
    model, tokenizer = base.model, base.tokenizer

    # ---- 1. three domain adapters, 10 chats each held out
    held: dict[str, list] = {}
    started = time.perf_counter()
    for domain in DOMAINS:
        items = read_interactions(EXAMPLES / f"domain-{domain}.jsonl")
        train_items, held[domain] = split_holdout(items, HELD_OUT / len(items), seed=0)
        store.create(f"domain:{domain}", LoraSettings(rank=8, alpha=16))
        result = trainer.update(f"domain:{domain}", train_items, UpdateConfig(epochs=epochs, holdout_fraction=0.1, seed=0))
        print(f"trained domain:{domain}: {result.metrics['steps']} steps, held-out loss "
              f"{result.metrics['heldout_loss_before']:.3f} -> {result.metrics['heldout_loss_after']:.3f} "
              f"({'current' if result.promoted else 'candidate'})", file=sys.stderr)
    train_seconds = time.perf_counter() - started

    # ---- 2. routing
    print(f"\n## Routing (top-1 on {HELD_OUT * len(DOMAINS)} held-out prompts; 3 domains trained {epochs} epochs in {train_seconds:.0f}s)\n")
    routers, build = {}, {}
    for method in ("centroid", "arrow"):
        router = Router(store, model, tokenizer, method=method, persist=False)
        t0 = time.perf_counter()
        router.refresh()
        build[method] = time.perf_counter() - t0
        routers[method] = router
    route_ms: dict[str, list[float]] = {m: [] for m in routers}
    correct = {m: 0 for m in routers}
    prefill_ms, generate_ms = [], []
    adapters = {d: weights_of(store, f"domain:{d}") for d in DOMAINS}
    # Interleaved per prompt, so load from anything else on the machine hits every column alike.
    for domain in DOMAINS:
        for k, item in enumerate(held[domain]):
            for method, router in routers.items():
                t0 = time.perf_counter()
                choice = router.route(item, top_k=1)[0]
                route_ms[method].append((time.perf_counter() - t0) * 1000)
                correct[method] += choice.adapter.startswith(f"domain:{domain}@")
            # the request being routed: the chat-templated prompt, with the right domain adapter active
            messages = [{"role": "user", "content": prompt_text(item)}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            with torch.inference_mode(), trainer.runtime.activate([Activation(adapters[domain])]):
                t0 = time.perf_counter()
                model(ids)
                prefill_ms.append((time.perf_counter() - t0) * 1000)
                if k < GENERATIONS:
                    t0 = time.perf_counter()
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
                    generate_ms.append((time.perf_counter() - t0) * 1000)
    n = HELD_OUT * len(DOMAINS)
    prefill, generate = statistics.median(prefill_ms), statistics.median(generate_ms)
    rows = []
    for method in routers:
        r = statistics.median(route_ms[method])
        rows.append([method, f"{correct[method]}/{n} ({correct[method] / n:.0%})", r, r / prefill, r / generate,
                     build[method]])
    print(table(["router", "top-1 accuracy", "route() ms (median)", "vs prefill", "vs prefill + 32 tokens",
                 "build, 3 domains (s)"], rows))
    print(f"\nthe routed request: prefill {prefill:.1f} ms, prefill + 32 generated tokens {generate:.0f} ms (medians; "
          "adapter active). Goal: accuracy >= 90%.\n")

    # ---- 3. merging
    examples = {d: trainer.tokenize(held[d], 512).examples for d in DOMAINS}
    own = {d: trainer.loss(examples[d], adapters[d])[0] for d in DOMAINS}

    def ratios(stack: list[AdapterWeights]) -> list[float]:
        """Loss under all of ``stack`` active at once, relative to each parent alone."""
        top, below = (stack[-1], stack[:-1]) if stack else (None, [])
        return [trainer.loss(examples[d], top, below=below)[0] / own[d] for d in DOMAINS]

    third = [dataclasses.replace(adapters[d], scale=adapters[d].scale / 3) for d in DOMAINS]  # each part *1/3
    rows = [["base alone (no adapter)", *ratios([]), None, None, None],
            ["stack of the 3 parents (inference)", *ratios([adapters[d] for d in DOMAINS]), None, None, None],
            ["stack, each part *1/3 (inference)", *ratios(third), None, None, None]]
    for label, method, options in MERGES:
        options = dict(options)
        weights = options.pop("weights", None)
        name = f"merged:{label.split(' ')[0].rstrip(',').replace('_', '-')}-{len(rows)}"
        t0 = time.perf_counter()
        info = merge(store, [f"domain:{d}" for d in DOMAINS], name, method, weights=weights, **options)
        seconds = time.perf_counter() - t0
        r = ratios([weights_of(store, name)])
        rows.append([label, *r, statistics.mean(r), info.lora["rank"], seconds])
    for row in rows[:3]:
        row[4] = statistics.mean(row[1:4])
    print("## Merging: each parent's held-out loss under the merge / under the parent alone (1.0 = nothing lost)\n")
    print(table(["merge (weights 1 each unless noted)", *(f"domain:{d}" for d in DOMAINS), "mean", "rank", "merge time (s)"],
                [[c if c is not None else "-" for c in row] for row in rows]))
    print("\nparents alone: " + ", ".join(f"domain:{d} {own[d]:.3f}" for d in DOMAINS) + " (mean loss per token)")


if __name__ == "__main__":
    main()
