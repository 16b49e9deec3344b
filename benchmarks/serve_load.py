"""Serving under open-loop load: the continuous-batching engine against its own single-request figures (issue 17).

    python benchmarks/serve_load.py [--load 3 --requests 64 --users 16 --tokens 32 --threads 2]
    python benchmarks/serve_load.py --rate 0.5 --rate 1.5      # fixed arrival rates (req/s) instead
    python benchmarks/serve_load.py --quick                    # smoke run: tiny random base, 8 requests

`persona serve`'s app on loopback (uvicorn, auth on), one adapter and one token per user, the
official `openai` client streaming each request (chat, greedy, `max_tokens` new tokens). Requests
arrive open loop: a Poisson process (seeded), request i always the same user and question. The rate
is ``--load`` requests per single-request latency, measured first in the same run (so the load
means the same on a fast or a busy machine), or fixed with ``--rate``. It reports single-request
time to first token (TTFT) and end-to-end latency (requests one at a time), then under load
p50/p95 TTFT and end-to-end latency, throughput (completed tokens per second from the first arrival
to the last completion), where the mean request's time to first token went, and whether the greedy
outputs under load equal the same requests run alone. (Until the static scheduler was removed, this
script ran it too, for the comparison kept in docs/BENCHMARKS.md.)
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import threading
import time
from typing import NamedTuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, temporary_folder, make_tiny  # noqa: E402

import torch  # noqa: E402

from persona import EMBEDDED_BASE, LoraSettings, Store  # noqa: E402
from persona.base import load_base  # noqa: E402
from persona.store.tokens import TokenStore  # noqa: E402
from persona.serving.engine import Engine  # noqa: E402
from persona.http.app import ServerConfig, create_app  # noqa: E402

QUESTIONS = ["What should I cook tonight?", "Tell me about my week.", "Any advice for today?", "Say something kind.",
             "How do I stay focused when I work from home?", "Give me one idea for a weekend trip."]


class Timing(NamedTuple):
    ttft: float  # seconds from sending to the first text
    e2e: float  # seconds from sending to the end of the stream
    tokens: int  # completion tokens (the usage chunk)
    text: str


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, action="append", help="arrivals per second (repeatable)")
    parser.add_argument("--load", type=float, default=3.0,
                        help="without --rate: arrivals per single-request latency")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--singles", type=int, default=6,
                        help="requests run one at a time for the single-request figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-batch", type=int, default=0,
                        help="rows the engine runs at once (0: one per user, --users)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random base, 8 requests, 8 tokens: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.users, args.tokens, args.singles = min(args.requests, 8), min(args.users, 4), 8, 2
    rates = args.rate
    torch.set_num_threads(args.threads)
    quick = " (QUICK: tiny random base)" if args.quick else ""
    header("persona serving under open-loop load: continuous batching against single requests" + quick)
    root = temporary_folder("load")
    base_id = make_tiny(root) if args.quick else EMBEDDED_BASE
    store = Store.init(root / "store", base=base_id)
    users = [f"user:u{i:02d}" for i in range(args.users)]
    tokens = {}
    for i, user in enumerate(users):
        store.create(user, LoraSettings(seed=i, init="random"))  # every user a distinct adapter: mix-ups would show
        tokens[user] = TokenStore(store).create(user)[0]
    base = load_base(store.config.base_id)
    max_batch = args.max_batch or args.users
    print(f"{args.requests} requests over {args.users} users (adapter + token each), {args.tokens} new tokens, greedy, "
          f"streamed with the openai client; max_batch {max_batch}, max_resident {args.users}, "
          f"max_batch_tokens {args.max_batch_tokens}\n")

    rows, checks = [], []
    engine = Engine(store, base=base, max_resident=args.users, max_batch=max_batch,
                    max_batch_tokens=args.max_batch_tokens)
    with serving(engine) as url:
        clients = {u: _client(url, tokens[u]) for u in users}
        warm = [threading.Thread(target=ask, args=(clients[u], u, k, 4)) for k, u in enumerate(users)]
        for thread in warm:  # warm-up: every adapter resident, every path run once
            thread.start()
        for thread in warm:
            thread.join()
        alone = [users[k % len(users)] for k in range(args.singles)]
        singles = [ask(clients[u], u, k, args.tokens) for k, u in enumerate(alone)]
        single_ttft = statistics.median(t.ttft for t in singles)
        single_e2e = statistics.median(t.e2e for t in singles)
        if rates is None:
            rates = [round(args.load / single_e2e, 3)]
            print(f"arrival rate: {rates[0]} requests/s ({args.load} per single-request latency "
                  f"{single_e2e:.3f} s)", flush=True)
        for rate in rates:
            before = engine.stats().times
            timings, wall = open_loop(clients, users, rate, args)
            client_ttft = statistics.mean(t.ttft for t in timings)
            print("    " + breakdown(before, engine.stats().times, client_ttft), flush=True)
            # Request i < singles is single request i (same user, same question): greedy, the same text.
            same = [t.text for t in timings[: len(singles)]] == [t.text for t in singles]
            checks.append(f"rate {rate}: greedy outputs under load identical to the same requests alone "
                          f"({min(len(singles), len(timings))} compared): {same}")
            ttfts, e2es = [t.ttft for t in timings], [t.e2e for t in timings]
            rows.append([rate, single_ttft, pct(ttfts, 50), pct(ttfts, 50) / single_ttft, pct(ttfts, 95),
                         single_e2e, pct(e2es, 50), pct(e2es, 50) / single_e2e, pct(e2es, 95),
                         sum(t.tokens for t in timings) / wall])
            print(f"  continuous at {rate}/s done: " + ", ".join(f"{x:.3g}" for x in rows[-1][1:]), flush=True)
    engine.close()
    print(table(["rate (req/s)", "single TTFT (s)", "p50 TTFT (s)", "p50 TTFT / single", "p95 TTFT (s)",
                 "single e2e (s)", "p50 e2e (s)", "p50 e2e / single", "p95 e2e (s)", "tokens/s"], rows))
    print()
    for line in checks:
        print(line)


def serving(engine: Engine):
    """``with serving(engine) as url``: persona's app on a free loopback port in a thread."""
    import contextlib

    import uvicorn

    @contextlib.contextmanager
    def run():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig()), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.should_exit = True
            thread.join(30)

    return run()


def _client(url: str, token: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=token, max_retries=0, timeout=600)


def ask(client, user: str, k: int, max_tokens: int) -> Timing:
    start = time.perf_counter()
    first, parts, used = None, [], 0
    stream = client.chat.completions.create(
        model=user, messages=[{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    e2e = time.perf_counter() - start
    return Timing(first if first is not None else e2e, e2e, used, "".join(parts))


def open_loop(clients, users, rate: float, args) -> tuple[list[Timing], float]:
    """Send request i at its Poisson arrival time (seeded: the same schedule for every engine), each in
    its own thread; returns every request's timing and the wall time from the first arrival to the last end."""
    rng = random.Random(args.seed)
    arrivals, t = [], 0.0
    for _ in range(args.requests):
        arrivals.append(t)
        t += rng.expovariate(rate)
    timings: list[Timing | None] = [None] * args.requests
    ends = [0.0] * args.requests

    def one(i: int) -> None:
        user = users[i % len(users)]
        timings[i] = ask(clients[user], user, i, args.tokens)
        ends[i] = time.perf_counter()

    threads = []
    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return [t for t in timings if t is not None], max(ends) - start


def breakdown(before, after, client_ttft: float) -> str:
    """Where the continuous engine's time went during one load run (``Engine.stats().times``): the mean
    request's way to its first token, what the HTTP hop adds to it (the clients' mean TTFT minus the
    engine's: parsing, admission, the stream's thread, SSE, the client), and the iterations.
    Relative shares: valid on a busy machine too."""
    d = {k: getattr(after, k) - getattr(before, k) for k in after.__dict__}
    n = max(d["first_tokens"], 1)
    phases = ("queue", "admission", "setup", "prefill", "first_token")
    total = sum(d[f"{p}_s"] for p in phases) or 1.0
    ways = ", ".join(f"{p} {1e3 * d[f'{p}_s'] / n:.1f} ms ({100 * d[f'{p}_s'] / total:.0f}%)" for p in phases)
    steps = max(d["decode_steps"], 1)
    http = 1e3 * (client_ttft - total / n)
    return (f"first token, mean of {d['first_tokens']}: {ways}; HTTP adds {http:.1f} ms to the engine's "
            f"{1e3 * total / n:.1f} ms; iterations: {d['prefill_steps']} prefill, "
            f"{d['decode_steps']} decode (mean {d['decode_rows'] / steps:.1f} rows, {1e3 * d['decode_s'] / steps:.1f} ms), "
            f"join re-pack {1e3 * d['join_s']:.0f} ms and route gathers {1e3 * d['routes_s']:.0f} ms in all")


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


if __name__ == "__main__":
    main()
