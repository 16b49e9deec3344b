"""Serving benchmark of the engine on the real embedded base, measured side by side in one run.

    PERSONA_CACHE=/tmp/pc python benchmarks/serve_engine.py [--threads 2 --repeats 3 --tokens 32]

On a GPU, where the embedded base's GGUF cannot travel, on SmolLM2-135M-Instruct's architecture
with random weights (throughput does not depend on weight values; correctness is checked too):

    python benchmarks/serve_engine.py --save-arch arch    # config.json + tokenizer files, a few MB
    python benchmarks/serve_engine.py --random-base arch --device cuda --adapters 8,32 --parts dacb

(a) cold load of one adapter until it can serve: persona (store load with hash check + slot copy)
    vs PEFT ``load_adapter`` from the same version folder;
(b) a mixed batch of 8 rows (``--adapters``: other sizes too) for as many different adapters, N new
    tokens, greedy: tokens/s of persona vs the base alone on the same batch, vs PEFT
    ``generate(adapter_names=...)``, vs one adapter at a time through persona. End-of-sequence is
    disabled everywhere so every row makes exactly N tokens;
(c) memory: bytes the engine holds for N resident adapters vs N x one adapter's safetensors file,
    and the base's parameters held once (on a GPU: slot tensors on the GPU, the CPU tier in host RAM);
(d) correctness (not in the default parts): every row of one mixed batch (each adapter once, plus
    the base) against PEFT with that row's adapter alone, max |logit difference|, per ``--check-dtypes``.

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

from _common import add_placement_options, make_random_base, placement, save_arch, temporary_folder  # noqa: E402,F401

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from persona import LoraSettings, Store  # noqa: E402
from persona.base import EMBEDDED_BASE, load_base, load_config, resolve_base  # noqa: E402
from persona.serving.engine import Engine  # noqa: E402
from persona.serving.requests import GenerationRequest  # noqa: E402
from persona.serving.sampling import SamplingParams  # noqa: E402
from persona.peft_format import (  # noqa: E402
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


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_store(root: Path, n: int, rank: int, base_id: str = EMBEDDED_BASE) -> Store:
    store = Store.init(root, base=base_id)
    config = load_config(base_id)
    settings = LoraSettings(rank=rank, init="random", target_modules=resolve_targets(LoraSettings(), config.model_type))
    shapes = lora_shapes(config, settings.target_modules)
    adapter_config = peft_adapter_config(settings, settings.target_modules, base_id)
    for i in range(n):
        tensors = init_lora_tensors(shapes, LoraSettings(rank=rank, init="random", seed=i))
        tensors = {k: (v * 0.02 if ".lora_B." in k else v) for k, v in tensors.items()}  # small B: text stays text
        store.create(f"user:u{i}", tensors=tensors, adapter_config=adapter_config)
    return store


def version_folder(store: Store, ref: str) -> Path:
    pinned = store.resolve(ref)
    return store._adapter_dir(pinned) / f"v{pinned.version:04d}"


Row = tuple[str, str, str, str]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def reference_model(base, dtype: torch.dtype, device: torch.device):
    """A plain transformers copy of the base (no persona wrappers) in ``dtype`` on ``device``."""
    return AutoModelForCausalLM.from_pretrained(base.info.path, dtype=dtype).to(device).eval()


def cold_load(store: Store, base, refs: list[str], repeats: int) -> list[Row]:
    """(a) From nothing in memory to able to serve: persona vs PEFT ``load_adapter``."""
    device = next(base.model.parameters()).device
    dtype = next(base.model.parameters()).dtype

    def persona_empty():
        engine = Engine(store, base=base)  # nothing resident, nothing in the CPU tier, no slot memory yet
        start = clock(device)
        engine.preload(refs[1])
        return clock(device) - start

    full = Engine(store, base=base, max_resident=4, cpu_cache=0)
    for ref in refs[:4]:
        full.preload(ref)
    victims = iter(refs[4:8] + refs[:8] * 100)  # round-robin over 8 adapters with 4 slots: LRU misses every time

    def persona_full():  # a running engine, every slot taken, no CPU tier: evict the LRU one, load from disk
        start = clock(device)
        full.preload(next(victims))
        return clock(device) - start

    model = reference_model(base, dtype, device)
    peft_model = PeftModel.from_pretrained(model, str(version_folder(store, refs[0])), adapter_name="u0").eval()
    counter = iter(range(10_000))

    def peft_load():  # a live PEFT model taking one more adapter
        name = f"cold{next(counter)}"
        start = clock(device)
        peft_model.load_adapter(str(version_folder(store, refs[1])), adapter_name=name)
        elapsed = clock(device) - start
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
    """(b) One batch of ``len(refs)`` rows for as many different adapters, greedy, ``tokens`` new tokens per row."""
    n = len(refs)
    device = next(base.model.parameters()).device
    dtype = next(base.model.parameters()).dtype
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    tok = base.tokenizer
    peft_model = PeftModel.from_pretrained(
        reference_model(base, dtype, device), str(version_folder(store, refs[0])), adapter_name="u0"
    )
    for i in range(1, n):
        peft_model.load_adapter(str(version_folder(store, refs[i])), adapter_name=f"u{i}")
    peft_model.eval()
    plain = reference_model(base, dtype, device)  # no wrappers at all
    engine = Engine(store, base=base, max_resident=max(16, n), max_batch=max(8, n))
    engine.eos_token_ids = frozenset()  # every row makes exactly `tokens` tokens, as min_new_tokens does below
    greedy = SamplingParams(max_new_tokens=tokens)
    mixed = [GenerationRequest(ref, prompt=p, params=greedy) for ref, p in zip(refs, prompts, strict=True)]
    base_rows = [GenerationRequest(engine.base_name, prompt=p, params=greedy) for p in prompts]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True).to(device)
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
        progress(f"(b) n={n} warm-up: {name}")
        fn()  # adapters resident, kernels and allocator warm
    times: dict[str, list[float]] = {k: [] for k in systems}
    for repeat in range(repeats):  # interleaved, so a noisy moment hits every system alike
        for name, fn in systems.items():
            start = clock(device)
            fn()
            times[name].append(clock(device) - start)
            progress(f"(b) n={n} run {repeat + 1}/{repeats}: {name} {times[name][-1]:.2f}s")
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
    peft_model = plain = None  # free both copies before the memory part (the closures above hold them)
    return rows


def memory(store: Store, base, refs: list[str]) -> list[Row]:
    """(c) What N resident adapters cost, and the base held once."""
    base_params = {p.data_ptr(): p.nbytes for p in base.model.parameters()}
    device = next(base.model.parameters()).device
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    engine = Engine(store, base=base, max_resident=max(16, len(refs)))
    for ref in refs:
        engine.preload(ref)
    stats = engine.stats()
    assert {p.data_ptr(): p.nbytes for p in base.model.parameters()} == base_params  # nothing of the base copied
    n = len(stats.resident)
    file_size = (version_folder(store, refs[0]) / ADAPTER_WEIGHTS).stat().st_size
    files = f"N x safetensors file {n * file_size / 1e6:.1f}"
    base_row = ("base parameters held (MB)", f"{sum(base_params.values()) / 1e6:.1f}", "once, whatever N", "1 copy")
    if device.type != "cuda":
        held = stats.slot_bytes + stats.cpu_cache_bytes
        return [
            (f"memory for N={n} resident adapters (MB)", f"{held / 1e6:.1f}", files,
             f"{held / (n * file_size):.3f}x (goal <= 1.2x)"),
            base_row,
        ]
    allocated = torch.cuda.memory_allocated(device) - before  # what the allocator really handed out
    return [
        (f"GPU memory for N={n} resident adapters: slot tensors (MB)", f"{stats.slot_bytes / 1e6:.1f}", files,
         f"{stats.slot_bytes / (n * file_size):.3f}x (goal <= 1.2x)"),
        ("  the same, by torch.cuda.memory_allocated (MB)", f"{allocated / 1e6:.1f}", files,
         f"{allocated / (n * file_size):.3f}x"),
        ("host RAM: the CPU tier's decoded copies (MB)", f"{stats.cpu_cache_bytes / 1e6:.1f}",
         "not GPU memory", "so evicted adapters reload without the store"),
        base_row,
    ]


def correctness(store: Store, base_id: str, refs: list[str], device: torch.device, dtypes: list[str]) -> list[Row]:
    """(d) One mixed batch, every adapter once plus the base, vs PEFT with each row's adapter alone.

    Equal-length rows without padding (PEFT's plain forward numbers positions 0.. on every row).
    In float32 the goal is max |logit difference| < 1e-4. In a 16-bit dtype both sides round
    differently (PEFT keeps the adapter's factors in float32, persona's slots are in the base's
    dtype), so there each side is compared with PEFT in float32, and persona's error should be of
    PEFT's order.
    """
    vocab = load_config(base_id).vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (len(refs) + 1, 24), generator=generator)
    pinned = [str(store.resolve(r)) for r in refs]
    reference: torch.Tensor | None = None  # PEFT float32, rows each alone
    rows: list[Row] = []
    for dtype_name in dtypes:
        progress(f"(d) correctness {dtype_name}")
        dtype = getattr(torch, dtype_name)
        base = load_base(base_id, dtype=dtype_name, device=str(device))
        engine = Engine(store, base=base, max_resident=len(refs), max_batch=len(refs) + 1)
        ours = engine.logits(ids, torch.ones_like(ids), [*pinned, engine.base_name]).float()
        engine.close()
        del engine, base
        progress(f"(d) persona's logits done; PEFT {dtype_name}, each row alone")
        theirs = peft_rows(store, base_id, refs, ids, dtype, device)
        if dtype == torch.float32:
            reference = theirs
        diff = [float((ours[i] - theirs[i]).abs().max()) for i in range(len(ids))]
        mixup = min(float((ours[i] - theirs[(i + 1) % len(refs)]).abs().max()) for i in range(len(refs)))
        label = f"{dtype_name}: {len(refs)} adapters + base in one batch, max abs logit diff vs PEFT per row"
        adapter_diff, base_diff = max(diff[:-1]), diff[-1]
        if dtype == torch.float32:
            verdict = "PASS" if max(diff) < 1e-4 else "FAIL"
            rows.append((label, f"{adapter_diff:.2e}", f"base row {base_diff:.2e}; another row's adapter {mixup:.2e}",
                         f"{verdict} (goal < 1e-4)"))
            continue
        rows.append((label, f"{adapter_diff:.2e}", f"base row {base_diff:.2e}; another row's adapter {mixup:.2e}",
                     "both sides rounded"))
        if reference is not None:
            ours_err = float((ours - reference).abs().max())
            peft_err = float((theirs - reference).abs().max())
            verdict = "PASS" if ours_err <= 2 * peft_err else "FAIL"
            rows.append((f"{dtype_name} vs PEFT float32: max abs logit diff", f"{ours_err:.2e}",
                         f"PEFT {dtype_name} vs PEFT float32 {peft_err:.2e}",
                         f"{ours_err / peft_err:.2f}x PEFT's error: {verdict} (goal <= 2x)"))
    return rows


def peft_rows(store: Store, base_id: str, refs: list[str], ids: torch.Tensor, dtype, device) -> torch.Tensor:
    """PEFT logits of row i of ``ids`` with adapter ``refs[i]`` alone (the last row: adapters disabled), float32."""
    model = AutoModelForCausalLM.from_pretrained(resolve_base(base_id), dtype=dtype).to(device).eval()
    model = PeftModel.from_pretrained(model, str(version_folder(store, refs[0])), adapter_name="u0")
    for i in range(1, len(refs)):
        model.load_adapter(str(version_folder(store, refs[i])), adapter_name=f"u{i}")
    model.eval()
    progress(f"(d) PEFT loaded {len(refs)} adapters")
    out = []
    with torch.no_grad():
        for i in range(len(refs)):
            model.set_adapter(f"u{i}")
            out.append(model(ids[i : i + 1].to(device)).logits[0].float())
        with model.disable_adapter():
            out.append(model(ids[-1:].to(device)).logits[0].float())
    return torch.stack(out)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def format_rows(rows: list[Row]) -> str:
    lines = ["| measurement | persona | reference | ratio |", "| --- | ---: | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the reference machine has 2 cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--parts", default="abc",
                        help="any of a (cold load), b (throughput), c (memory), d (correctness vs PEFT), "
                             "run in the order given")
    parser.add_argument("--base", default=EMBEDDED_BASE, help="base model id or folder (default: the embedded base)")
    parser.add_argument("--random-base", type=Path, metavar="ARCH",
                        help="instead of --base: ARCH's architecture (config.json + tokenizer files) with random "
                             "weights made here, seeded (throughput does not depend on weight values)")
    parser.add_argument("--save-arch", type=Path, metavar="DIR",
                        help="write --base's config.json and tokenizer files (no weights) to DIR, then exit")
    add_placement_options(parser)  # the base's (and so the engine slots') device and dtype in parts a, b, c
    parser.add_argument("--adapters", default="8", help="comma-separated batch sizes for b: that many rows, each "
                        "for its own adapter (the store holds the largest, and at least 8)")
    parser.add_argument("--check-dtypes", default="float32", help="comma-separated dtypes for part d")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.save_arch is not None:
        save_arch(args.base, args.save_arch)
        print(f"wrote {args.base}'s config and tokenizer to {args.save_arch}")
        return
    torch.set_num_threads(args.threads)
    device, args.dtype = placement(args)
    sizes = [int(x) for x in args.adapters.split(",")]
    check_dtypes = [x.strip() for x in args.check_dtypes.split(",")]
    n = max(8, *sizes)

    root = temporary_folder("serve")
    base_id = args.base
    if args.random_base is not None:
        progress(f"making random weights of {args.random_base}'s architecture")
        base_id = make_random_base(args.random_base, root / "random-base")
    config = load_config(base_id)
    arch = (f"{config.architectures[0]}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size}")
    print(f"command: {' '.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"base {args.base if args.random_base is None else 'RANDOM WEIGHTS'} {args.dtype} on {device}")
    if args.random_base is not None:
        print(f"base: RANDOM WEIGHTS (seeded, the model class's own init) of the architecture in "
              f"{args.random_base} ({arch}); tokens/s and memory hold for that architecture, the text is noise")
    print(f"adapters: {n} x rank {args.rank}, all linear layers of every block; "
          f"median of {args.repeats} after a warm-up")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    sys.stdout.flush()

    store = make_store(root / "adapters", n, args.rank, base_id)
    refs = [f"user:u{i}" for i in range(n)]
    progress(f"store ready: {n} adapters")
    base = None
    rows: list[Row] = []
    for part in args.parts:
        if part in "abc" and base is None:
            # persona's copy (its linear layers get wrapped)
            base = load_base(base_id, dtype=args.dtype, device=str(device))
        if part == "a":
            new = cold_load(store, base, refs, args.repeats)
        elif part == "b":
            new = []
            for size in sizes:
                new += throughput(store, base, refs[:size], args.tokens, args.repeats)
                if len(sizes) > 1:
                    progress(f"part b, {size} rows done:\n{format_rows(new[-4:])}")
        elif part == "c":
            new = memory(store, base, refs)
        elif part == "d":
            new = correctness(store, base_id, refs[:8], device, check_dtypes)
        else:
            continue
        progress(f"part {part} done:\n{format_rows(new)}")  # kept if a later part is cut short
        rows += new

    print(format_rows(rows))
    if device.type == "cuda":
        print(f"\npeak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(another busy process on the machine skews every timing)")


if __name__ == "__main__":
    main()
