"""Serving benchmark of the engine on the real embedded base, measured side by side in one run.

    PERSONA_CACHE=/tmp/pc python benchmarks/serve_engine.py [--threads 2 --repeats 3 --tokens 32]

(a) cold load of one adapter until it can serve: persona (store load with hash check + slot copy)
    vs PEFT ``load_adapter`` from the same version folder;
(b) a mixed batch of 8 rows for 8 different adapters, N new tokens, greedy: tokens/s of persona vs
    the base alone on the same batch, vs PEFT ``generate(adapter_names=...)``, vs one adapter at a
    time through persona. End-of-sequence is disabled everywhere so every row makes exactly N tokens;
(c) memory: bytes the engine holds for N resident adapters vs N x one adapter's safetensors file,
    and the base's parameters held once.

Adapters are random (A and B both random, B scaled down so the text stays text-like); throughput
does not depend on what they learned. Each timing is the median of ``--repeats`` runs after a
warm-up, with the systems interleaved so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import temporary_folder  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from persona import LoraSettings, Store  # noqa: E402
from persona.base import EMBEDDED_BASE, load_base, load_config  # noqa: E402
from persona.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from persona.lora import (  # noqa: E402
    ADAPTER_WEIGHTS,
    init_lora_tensors,
    lora_shapes,
    peft_adapter_config,
    resolve_targets,
)

PROMPTS = [
    "Write a short note to a colleague about the meeting tomorrow.",
    "Explain why the sky is blue in two sentences.",
    "List three tips for staying focused while working from home.",
    "What is the capital of France, and what is it known for?",
    "Summarize the plot of a heist movie in one paragraph.",
    "Give me a recipe idea using rice, eggs and spinach.",
    "How do I politely decline an invitation to a party?",
    "Describe a sunrise over the ocean for a children's book.",
]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_store(root: Path, n: int, rank: int) -> Store:
    store = Store.init(root, base=EMBEDDED_BASE)
    config = load_config(EMBEDDED_BASE)
    settings = LoraSettings(rank=rank, init="random", target_modules=resolve_targets(LoraSettings(), config.model_type))
    shapes = lora_shapes(config, settings.target_modules)
    adapter_config = peft_adapter_config(settings, settings.target_modules, EMBEDDED_BASE)
    for i in range(n):
        tensors = init_lora_tensors(shapes, LoraSettings(rank=rank, init="random", seed=i))
        tensors = {k: (v * 0.02 if ".lora_B." in k else v) for k, v in tensors.items()}  # small B: text stays text
        store.create(f"user:u{i}", tensors=tensors, adapter_config=adapter_config)
    return store


def version_folder(store: Store, ref: str) -> Path:
    pinned = store.resolve(ref)
    return store.adapter_dir(pinned) / f"v{pinned.version:04d}"


Row = tuple[str, str, str, str]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def cold_load(store: Store, base, refs: list[str], repeats: int) -> list[Row]:
    """(a) From nothing in memory to able to serve: persona vs PEFT ``load_adapter``."""

    def persona_empty():
        engine = Engine(store, base=base)  # nothing resident, nothing in the CPU tier, no slot memory yet
        start = time.perf_counter()
        engine.preload(refs[1])
        return time.perf_counter() - start

    full = Engine(store, base=base, max_resident=4, cpu_cache=0)
    for ref in refs[:4]:
        full.preload(ref)
    victims = iter(refs[4:] + refs * 100)  # round-robin over 8 adapters with 4 slots: LRU misses every time

    def persona_full():  # a running engine, every slot taken, no CPU tier: evict the LRU one, load from disk
        start = time.perf_counter()
        full.preload(next(victims))
        return time.perf_counter() - start

    model = AutoModelForCausalLM.from_pretrained(base.info.path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, str(version_folder(store, refs[0])), adapter_name="u0").eval()
    counter = iter(range(10_000))

    def peft_load():  # a live PEFT model taking one more adapter
        name = f"cold{next(counter)}"
        start = time.perf_counter()
        peft_model.load_adapter(str(version_folder(store, refs[1])), adapter_name=name)
        elapsed = time.perf_counter() - start
        peft_model.delete_adapter(name)
        return elapsed

    progress("(a) cold loads")
    for fn in (persona_empty, persona_full, peft_load):
        fn()  # warm-up (imports, page cache)
    loads_before = full.stats().loads
    times: dict[str, list[float]] = {"empty": [], "full": [], "peft": []}
    for _ in range(max(7, repeats)):
        times["empty"].append(persona_empty())
        times["full"].append(persona_full())
        times["peft"].append(peft_load())
    assert full.stats().loads - loads_before == len(times["full"])  # each was a real load from the store
    t_empty, t_full, t_peft = (statistics.median(times[k]) for k in ("empty", "full", "peft"))
    peft_ms = f"PEFT load_adapter {ms(t_peft)}"
    return [
        ("cold load, running engine: evict LRU + store load + slot copy (ms)", ms(t_full), peft_ms,
         f"{t_peft / t_full:.1f}x faster (goal >= 10x)"),
        ("cold load, new empty engine (+ its first slot memory) (ms)", ms(t_empty), peft_ms,
         f"{t_peft / t_empty:.1f}x faster"),
    ]


def throughput(store: Store, base, refs: list[str], tokens: int, repeats: int) -> list[Row]:
    """(b) One batch of 8 rows for 8 different adapters, greedy, ``tokens`` new tokens per row."""
    n = len(refs)
    tok = base.tokenizer
    model = AutoModelForCausalLM.from_pretrained(base.info.path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, str(version_folder(store, refs[0])), adapter_name="u0")
    for i in range(1, n):
        peft_model.load_adapter(str(version_folder(store, refs[i])), adapter_name=f"u{i}")
    peft_model.eval()
    plain = AutoModelForCausalLM.from_pretrained(base.info.path, dtype=torch.float32).eval()  # no wrappers at all
    engine = Engine(store, base=base, max_resident=16)
    engine.eos_token_ids = frozenset()  # every row makes exactly `tokens` tokens, as min_new_tokens does below
    greedy = SamplingParams(max_new_tokens=tokens)
    mixed = [GenerationRequest(ref, prompt=p, params=greedy) for ref, p in zip(refs, PROMPTS, strict=False)]
    base_rows = [GenerationRequest(engine.base_name, prompt=p, params=greedy) for p in PROMPTS]
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    hf_kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def persona_mixed():
        results = engine.generate(mixed)
        assert sum(r.completion_tokens for r in results) == n * tokens

    def persona_base():
        engine.generate(base_rows)

    def persona_one_at_a_time():
        for request in mixed:
            engine.generate([request])

    def transformers_base():
        with torch.no_grad():
            out = plain.generate(**batch, **hf_kwargs)
        assert out.shape[1] == batch["input_ids"].shape[1] + tokens

    def peft_mixed():
        with torch.no_grad():
            peft_model.generate(**batch, adapter_names=[f"u{i}" for i in range(n)], **hf_kwargs)

    systems = {
        "persona mixed": persona_mixed,
        "base alone, transformers generate": transformers_base,
        "base alone, persona loop": persona_base,
        "PEFT generate(adapter_names)": peft_mixed,
        "persona, one adapter at a time": persona_one_at_a_time,
    }
    for name, fn in systems.items():
        progress(f"(b) warm-up: {name}")
        fn()  # adapters resident, kernels and allocator warm
    times: dict[str, list[float]] = {k: [] for k in systems}
    for repeat in range(repeats):  # interleaved, so a noisy moment hits every system alike
        for name, fn in systems.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            progress(f"(b) run {repeat + 1}/{repeats}: {name} {times[name][-1]:.2f}s")
    tps = {k: n * tokens / statistics.median(v) for k, v in times.items()}
    ours = tps["persona mixed"]
    goals = {
        "base alone, transformers generate": " (goal >= 0.85)",
        "base alone, persona loop": "",
        "PEFT generate(adapter_names)": "x faster (goal >= 1.7x)",
        "persona, one adapter at a time": "x faster (goal >= 4x)",
    }
    rows: list[Row] = []
    for name, goal in goals.items():
        label = f"mixed batch, {n} adapters x {tokens} tokens: tokens/s" if not rows else ""
        value = f"{ours:.1f}" if not rows else ""
        rows.append((label, value, f"{name} {tps[name]:.1f}", f"{ours / tps[name]:.2f}{goal}"))
    engine.close()
    return rows


def memory(store: Store, base, refs: list[str]) -> list[Row]:
    """(c) What N resident adapters cost, and the base held once."""
    base_params = {p.data_ptr(): p.nbytes for p in base.model.parameters()}
    engine = Engine(store, base=base, max_resident=16)
    for ref in refs:
        engine.preload(ref)
    stats = engine.stats()
    assert {p.data_ptr(): p.nbytes for p in base.model.parameters()} == base_params  # nothing of the base copied
    n = len(stats.resident)
    file_size = (version_folder(store, refs[0]) / ADAPTER_WEIGHTS).stat().st_size
    held = stats.slot_bytes + stats.cpu_cache_bytes
    return [
        (f"memory for N={n} resident adapters (MB)", f"{held / 1e6:.1f}",
         f"N x safetensors file {n * file_size / 1e6:.1f}", f"{held / (n * file_size):.3f}x (goal <= 1.2x)"),
        ("base parameters held (MB)", f"{sum(base_params.values()) / 1e6:.1f}", "once, whatever N", "1 copy"),
    ]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the reference machine has 2 cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--parts", default="abc", help="any of a (cold load), b (throughput), c (memory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    n = 8

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"base {EMBEDDED_BASE} float32")
    print(f"adapters: {n} x rank {args.rank}, all linear layers of every block; "
          f"median of {args.repeats} after a warm-up")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    root = temporary_folder("serve")
    store = make_store(root / "adapters", n, args.rank)
    refs = [f"user:u{i}" for i in range(n)]
    base = load_base(EMBEDDED_BASE)  # persona's copy (its linear layers get wrapped)
    rows: list[Row] = []
    if "a" in args.parts:
        rows += cold_load(store, base, refs, args.repeats)
    if "b" in args.parts:
        rows += throughput(store, base, refs, args.tokens, args.repeats)
    if "c" in args.parts:
        rows += memory(store, base, refs)

    print("| measurement | persona | reference | ratio |")
    print("| --- | ---: | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(another busy process on the machine skews every timing)")


if __name__ == "__main__":
    main()
