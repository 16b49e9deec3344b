"""Shared helpers for the benchmarks: environment header, work folder and base, timing, markdown tables."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def header(title: str) -> None:
    import torch
    import transformers
    import peft

    print(f"# {title}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    print()


@contextmanager
def workspace(name: str, quick: bool) -> Iterator[tuple[Path, str]]:
    """A temporary work folder (removed after) and the base to run on: the embedded base, or with
    ``quick`` a tiny random Llama with the real tokenizer saved in the folder (numbers meaningless,
    it checks the script runs)."""
    from persona import EMBEDDED_BASE

    work = temporary_folder(name)
    try:
        yield work, (make_tiny(work) if quick else EMBEDDED_BASE)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def temporary_folder(name: str) -> Path:
    """A new folder under the system's temp dir, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=f"persona-bench-{name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def make_tiny(work: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from persona import EMBEDDED_BASE
    from persona.base import load_tokenizer

    tok = load_tokenizer(EMBEDDED_BASE)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "tiny")
    tok.save_pretrained(work / "tiny")
    return str(work / "tiny")


@contextmanager
def timed(into: list[float]):
    start = time.perf_counter()
    yield
    into.append(time.perf_counter() - start)


def median(xs) -> float:
    return statistics.median(xs)


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def add_placement_options(parser) -> None:
    """``--device``/``--dtype`` as ``persona``'s commands take them (auto: a GPU in bfloat16 where torch sees one)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda where torch sees a GPU)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the base (auto: bfloat16 on a GPU that has it, else float32)")


def placement(args, *, training: bool = False):
    """``(torch.device, dtype name)`` for parsed ``--device``/``--dtype``; a missing GPU stops the run here."""
    from persona.base import resolve_device

    device, dtype = resolve_device(args.device, args.dtype, training=training)
    return device, str(dtype).removeprefix("torch.")


def device_line(device) -> str:
    import torch

    if device.type != "cuda":
        return f"device: {device}"
    return f"device: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"


def save_arch(base_id: str, folder: Path) -> None:
    """Write ``base_id``'s config.json and tokenizer files (no weights) to ``folder``."""
    from persona.base import load_config, load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    load_config(base_id).save_pretrained(folder)
    load_tokenizer(base_id).save_pretrained(folder)


def make_random_base(arch: Path, target: Path, seed: int = 0) -> str:
    """A base of ``arch``'s architecture (its config.json) with random weights (the model class's own
    initialization, seeded), float32 safetensors, and ``arch``'s tokenizer files beside them."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)  # float32 whatever the config says
    model.save_pretrained(target, safe_serialization=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(arch)
    except Exception:  # noqa: BLE001 - a tokenizer_config.json from another transformers version: the file alone
        from transformers import PreTrainedTokenizerFast

        settings = json.loads((arch / "tokenizer_config.json").read_text())
        special = {k: v for k, v in settings.items() if k.endswith("_token") and isinstance(v, str)}
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(arch / "tokenizer.json"), **special)
    tokenizer.save_pretrained(target)
    return str(target)


