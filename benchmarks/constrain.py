"""What per-row logit work costs a decode batch: plain rows, logprobs rows, JSON-constrained rows.

    python benchmarks/constrain.py [--tokens 32 --repeats 3 --threads 2]
    python benchmarks/constrain.py --quick    # tiny random model: checks the script runs (numbers meaningless)

A batch of 8 greedy rows on one adapter makes ``--tokens`` tokens each (end-of-sequence disabled,
and a schema whose JSON cannot close early, so every configuration runs the same number of steps):
all plain; 7 plain + 1 constrained to a JSON schema; all 8 constrained; all 8 with ``logprobs=5``.
It reports the median seconds per decode step and the ratio to the all-plain batch, and checks that
plain rows produce the same text beside constrained ones as alone. A second table times the grammar
itself per step: llguidance's mask, and unpacking it onto the logits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, median, table, workspace  # noqa: E402

# A string that may not close before 512 characters: the row runs its whole token budget.
SCHEMA = {"type": "object", "properties": {"notes": {"type": "string", "minLength": 512}}, "required": ["notes"]}
PROMPT = "Write down what you know about the weather."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    import torch

    from persona import LoraSettings, ResponseFormat, Store
    from persona.serving.engine import Engine
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    header("Per-row logit work in a decode batch (logprobs, JSON schema)")
    with workspace("constrain", args.quick) as (work, base):
        store = Store.init(work / "store", base=base)
        store.create("user:alice", LoraSettings(init="random", seed=1, rank=8))
        engine = Engine(store, max_batch=8)
        engine.eos_token_ids = frozenset()  # every row makes exactly --tokens tokens
        fmt = ResponseFormat.from_schema(SCHEMA)

        def rows(kinds: str) -> list[GenerationRequest]:
            params = {"p": SamplingParams(max_new_tokens=args.tokens),
                      "j": SamplingParams(max_new_tokens=args.tokens, response_format=fmt),
                      "l": SamplingParams(max_new_tokens=args.tokens, logprobs=5)}
            return [GenerationRequest("user:alice", prompt=f"{PROMPT} ({i})", params=params[k]) for i, k in enumerate(kinds)]

        configs = [("8 plain", "pppppppp"), ("7 plain + 1 json_schema", "jppppppp"), ("8 json_schema", "jjjjjjjj"),
                   ("8 plain with logprobs=5", "llllllll")]
        engine.generate(rows("jl"))  # warm-up: wraps the tokenizer for llguidance once
        times: dict[str, list[float]] = {name: [] for name, _ in configs}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every configuration alike
            for name, kinds in configs:
                start = time.perf_counter()
                results = engine.generate(rows(kinds))
                times[name].append((time.perf_counter() - start) / args.tokens)
                texts[name] = [r.text for r in results]
        plain = median(times["8 plain"])
        print(table(["batch", "s / decode step", "vs 8 plain"],
                    [[name, median(times[name]), median(times[name]) / plain] for name, _ in configs]))
        same = texts["7 plain + 1 json_schema"][1:] == texts["8 plain"][1:]
        print(f"\nplain rows identical beside a constrained row: {same}")

        grammar = engine.vocabulary.matcher(fmt)
        words, native, applied = grammar._words, [], []
        logits = torch.zeros(engine.vocabulary.vocab_size)
        for token in engine.tokenizer('{"notes":"' + "sunny and warm " * 8, add_special_tokens=False)["input_ids"]:
            start = time.perf_counter()
            grammar._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
            native.append(time.perf_counter() - start)
            start = time.perf_counter()
            grammar.mask_(logits)
            applied.append(time.perf_counter() - start)
            grammar.advance(token)
            logits.zero_()
        print()
        print(table(["grammar step", "ms (median)"], [["llguidance mask", 1e3 * median(native)],
                                                      ["mask_ (mask again, cached, + unpack + fill)", 1e3 * median(applied)]]))
        engine.close()


if __name__ == "__main__":
    main()
