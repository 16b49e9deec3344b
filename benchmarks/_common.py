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
