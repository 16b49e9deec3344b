"""Server benchmark: 16 concurrent clients over 16 users vs the same requests one at a time.

    python benchmarks/serve_http.py [--users 16 --tokens 32 --threads 2]
    python benchmarks/serve_http.py --device cuda --random-base arch    # on a GPU (see serve_engine.py)

The real embedded base behind `persona serve`'s app (uvicorn on loopback, auth on), one adapter per
user, each request a chat for its own user with its own token. Reports requests/s of both ways and
p50/p95 latency per request; the engine's worker batches concurrent requests across adapters.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_placement_options, device_line, header, make_random_base, placement, table,  # noqa: E402
                     temporary_folder)

import httpx  # noqa: E402
import torch  # noqa: E402

from persona import EMBEDDED_BASE, LoraSettings, Store  # noqa: E402
from persona.store.tokens import TokenStore  # noqa: E402
from persona.serving.engine import Engine  # noqa: E402
from persona.http.app import ServerConfig, create_app  # noqa: E402

QUESTIONS = ["What should I cook tonight?", "Tell me about my week.", "Any advice for today?", "Say something kind."]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-base", type=Path, metavar="ARCH",
                        help="ARCH's architecture (config.json + tokenizer, from serve_engine.py --save-arch) with "
                             "random weights instead of the embedded base: requests/s hold, the text is noise")
    add_placement_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = placement(args)
    header("persona server benchmark" + (" (RANDOM WEIGHTS of the base's architecture)" if args.random_base else ""))
    print(f"{device_line(device)}, base dtype {dtype}\n")
    import uvicorn

    root = temporary_folder("http")
    base_id = make_random_base(args.random_base, root / "random-base") if args.random_base else EMBEDDED_BASE
    store = Store.init(root / "store", base=base_id)
    users = [f"user:u{i:02d}" for i in range(args.users)]
    tokens = {}
    for i, user in enumerate(users):
        store.create(user, LoraSettings(seed=i))
        tokens[user] = TokenStore(store).create(user)[0]
    engine = Engine(store, max_resident=args.users, max_batch=args.users, device=device, dtype=dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig()), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def ask(user: str, k: int) -> float:
        body = {"model": user, "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
                "max_tokens": args.tokens, "temperature": 0}
        start = time.perf_counter()
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {tokens[user]}"}, timeout=600)
        response.raise_for_status()
        return time.perf_counter() - start

    for k, user in enumerate(users):  # warm-up: every adapter resident, every code path run once
        ask(user, k)

    start = time.perf_counter()
    sequential = [ask(user, k) for k, user in enumerate(users)]
    seq_wall = time.perf_counter() - start

    concurrent: list[float] = [0.0] * len(users)

    def worker(k: int, user: str) -> None:
        concurrent[k] = ask(user, k)

    threads = [threading.Thread(target=worker, args=(k, u)) for k, u in enumerate(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    con_wall = time.perf_counter() - start
    server.should_exit = True
    engine.close()

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]

    print(table(["mode", "requests/s", "p50 latency (s)", "p95 latency (s)", "wall (s)"], [
        [f"{args.users} clients at once", args.users / con_wall, pct(concurrent, 50), pct(concurrent, 95), con_wall],
        ["one at a time", args.users / seq_wall, pct(sequential, 50), pct(sequential, 95), seq_wall],
    ]))
    print(f"\nthroughput ratio, concurrent / one at a time: {seq_wall / con_wall:.2f}x "
          f"({args.users} users, {args.tokens} new tokens each, greedy)")


if __name__ == "__main__":
    main()
