"""Gateway overhead: the same chat through `persona serve --upstream` vs straight to the upstream.

    python benchmarks/gateway.py [--requests 30 --tokens 32 --threads 2] [--quick]

Two real processes on loopback over one store: a `persona serve` (the embedded base, auth on) as the
upstream and a `persona serve --upstream URL` gateway in front of it. Each round sends one request
straight to the upstream (the pinned name `user:alice@v1`, the gateway's key) and one through the
gateway (`user:alice`, alice's token: authenticated, scope-checked, pinned, forwarded), alternating
which goes first, so both see the same machine state. Reports p50/p95 latency of each way, whole
answers and streamed (time to the first content event and to [DONE]), and the ratio gateway/direct
(goal <= 1.10 on a 32-token request). ``--quick`` runs on a tiny random model (numbers meaningless:
it checks the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, workspace  # noqa: E402

import httpx  # noqa: E402

from persona import LoraSettings, Store  # noqa: E402
from persona.store.tokens import TokenStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short paragraph about the sea."}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(store: Path, threads: int, *args: str) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "persona", "serve", "--store", str(store), "--port", str(port),
                             "--max-per-token", "64", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"persona serve {' '.join(args)} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SystemExit("persona serve did not start")
        time.sleep(0.2)


def _whole(client: httpx.Client, url: str, token: str, model: str, tokens: int) -> tuple[float, int]:
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0}
    start = time.perf_counter()
    response = client.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()["usage"]["completion_tokens"]


def _streamed(client: httpx.Client, url: str, token: str, model: str, tokens: int) -> tuple[float, float]:
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    start, first = time.perf_counter(), None
    with client.stream("POST", url + "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {token}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="requests each way (alternating)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the upstream")
    parser.add_argument("--quick", action="store_true", help="a tiny random model: checks the script runs")
    args = parser.parse_args(argv)
    header("persona gateway overhead")
    with workspace("gateway", args.quick) as (work, base):
        root = work / "store"
        store = Store.init(root, base=base)
        store.create("user:alice", LoraSettings(init="random", seed=1))
        tokens = TokenStore(store)
        alice, key = tokens.create("user:alice")[0], tokens.create("admin")[0]
        procs: list[subprocess.Popen] = []
        try:
            upstream, upstream_url = _start(root, args.threads)
            procs.append(upstream)
            gateway, gateway_url = _start(root, 1, "--upstream", upstream_url, "--upstream-key", key)
            procs.append(gateway)
            ways = {"direct": (upstream_url, key, "user:alice@v1"), "gateway": (gateway_url, alice, "user:alice")}
            whole: dict[str, list[float]] = {w: [] for w in ways}
            first: dict[str, list[float]] = {w: [] for w in ways}
            done: dict[str, list[float]] = {w: [] for w in ways}
            produced = set()
            with httpx.Client(timeout=600) as client:
                for way in ways.values():  # warm-up: the adapter resident, every code path run once
                    _whole(client, *way, args.tokens)
                    _streamed(client, *way, args.tokens)
                for i in range(args.requests):
                    order = list(ways) if i % 2 == 0 else list(reversed(ways))
                    for w in order:
                        elapsed, n = _whole(client, *ways[w], args.tokens)
                        whole[w].append(elapsed)
                        produced.add(n)
                    for w in order:
                        ttft, total = _streamed(client, *ways[w], args.tokens)
                        first[w].append(ttft)
                        done[w].append(total)
                    print(f"round {i + 1}/{args.requests}: whole p50 direct {statistics.median(whole['direct']):.3f} s, "
                          f"gateway {statistics.median(whole['gateway']):.3f} s", file=sys.stderr, flush=True)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    rows = []
    for label, series in (("whole answer", whole), ("streamed: first content event", first),
                          ("streamed: to [DONE]", done)):
        d, g = statistics.median(series["direct"]), statistics.median(series["gateway"])
        rows.append([label, f"{d * 1000:.1f}", f"{g * 1000:.1f}", f"{(g - d) * 1000:+.1f}", f"{g / d:.3f}",
                     f"{_p(series['direct'], 0.95) * 1000:.1f}", f"{_p(series['gateway'], 0.95) * 1000:.1f}"])
    print(f"{args.requests} requests each way, alternating; {args.tokens} max tokens "
          f"(completion tokens produced: {sorted(produced)}); upstream torch threads {args.threads}"
          + ("; TINY RANDOM MODEL (--quick): numbers meaningless" if args.quick else ""))
    print()
    print(table(["request", "direct p50 ms", "gateway p50 ms", "overhead ms", "ratio (goal <= 1.10)",
                 "direct p95 ms", "gateway p95 ms"], rows))


if __name__ == "__main__":
    main()
