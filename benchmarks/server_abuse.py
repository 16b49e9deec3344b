"""Abuse check of `persona serve` (issue 10): one hostile client must not stall, bloat or hang it.

    python benchmarks/server_abuse.py [--quick] [--paths 20000]

Starts `persona serve` (auth on, default limits) as a child process on 127.0.0.1 over a fresh store
on the embedded base (``--quick``: a tiny random model; its numbers only show the script runs), then:

1. /healthz latency while a maximum-size body is in flight: a body just under --max-body-bytes
   (refused by the prompt-size check, unread by the tokenizer), and the largest prompt that passes
   that check (tokenized, off the event loop). Goal: < 100 ms.
2. RSS of the server before and after N token-less GETs to random paths. Goal: flat within 5%.
3. CPU of the server 2 s after 4 clients (2 streaming, 2 not) disconnect mid-generation. Goal: idle.
4. SIGTERM to exit with 4 streaming requests in flight (default --drain-timeout 5 s). Goal: < 10 s.

Loopback only, every wait bounded, the server is killed on any way out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, workspace  # noqa: E402

import httpx  # noqa: E402

from persona import Store  # noqa: E402
from persona.store.tokens import TokenStore  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads


class Server:
    """`persona serve` as a child process; killed on exit whatever happened."""

    def __init__(self, store: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "persona", "serve", "--store", str(store), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"persona serve exited with {self.proc.returncode}; see {log}")
            try:
                self.base = httpx.get(self.url + "/healthz", timeout=2).json()["base"]
                return
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise SystemExit(f"persona serve did not start in 300 s; see {log}") from None
                time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def metric(server: Server, token: str, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    found = re.search(rf"^{name} (\S+)", text, re.M)
    return float(found.group(1)) if found else float("nan")


def healthz_while(server: Server, send, repeats: int) -> list[float]:
    """/healthz latencies (s), polled every 10 ms while ``send()`` runs ``repeats`` times in a thread."""
    done = threading.Event()
    outcome: list[int] = []

    def sender():
        try:
            for _ in range(repeats):
                outcome.append(send())
        finally:
            done.set()

    threading.Thread(target=sender, daemon=True).start()
    latencies = []
    with httpx.Client(timeout=30) as http:
        while not done.is_set():
            start = time.perf_counter()
            http.get(server.url + "/healthz")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    print(f"  statuses of the big requests: {sorted(set(outcome))}, {len(latencies)} /healthz probes")
    return latencies


def chat_body(server: Server, content: str) -> bytes:
    """Encoded once, before timing: the prober shares this process's GIL with the sender."""
    return json.dumps({"model": server.base, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}).encode()


def big_chat(server: Server, token: str, body: bytes) -> int:
    response = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=120,
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return response.status_code


def random_paths(server: Server, n: int, clients: int = 4) -> None:
    def worker(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(n // clients):
                http.get("/" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


def streams_in_flight(server: Server, token: str, n: int, max_tokens: int):
    """Start n streaming chats; return (their threads, the lines each received, an event per first chunk)."""
    lines: list[list[str]] = [[] for _ in range(n)]
    first = [threading.Event() for _ in range(n)]
    stop = threading.Event()

    def client(i: int) -> None:
        body = {"model": server.base, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": f"Tell me a long story number {i}."}]}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {token}"}) as response:
                for line in response.iter_lines():
                    lines[i].append(line)
                    if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                        first[i].set()
                    if stop.is_set():
                        return  # leaving the with-block drops the connection mid-stream
        except httpx.HTTPError as exc:
            lines[i].append(f"error: {exc}")
        finally:
            first[i].set()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, lines, first, stop


def wait_in_flight(server: Server, token: str, n: int, limit_s: float = 300) -> None:
    deadline = time.time() + limit_s
    while metric(server, token, "persona_requests_in_flight") < n:
        if time.time() > deadline:
            raise SystemExit(f"fewer than {n} requests reached the engine in {limit_s} s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model (checks the script, numbers meaningless)")
    parser.add_argument("--paths", type=int, default=20_000, help="random-path requests for the RSS check")
    args = parser.parse_args()
    header("persona server abuse check")
    from persona.base import load_config, load_tokenizer
    from persona.http.app import MAX_BODY_BYTES

    with workspace("abuse", args.quick) as (work, base):
        store = Store.init(work / "store", base=base)
        token = TokenStore(store).create("admin")[0]
        tokenizer, config = load_tokenizer(base), load_config(base)
        context = config.max_position_embeddings
        max_token_chars = max(len(t) for t in tokenizer.get_vocab())
        server = Server(work / "store", work / "serve.log")
        print(f"base: {server.base} (context {context} tokens), server pid {server.proc.pid}, log {work / 'serve.log'}\n")
        rows = []
        try:
            # 1. /healthz while a maximum-size body is in flight
            print("1. /healthz while big bodies are in flight")
            lat = healthz_while(server, lambda: time.sleep(3) or 0, repeats=1)
            rows.append(["/healthz, nothing else in flight (baseline): p50 / max (ms)",
                         f"{statistics.median(lat) * 1e3:.1f} / {max(lat) * 1e3:.1f}", "", ""])
            filler = chat_body(server, "x" * (MAX_BODY_BYTES - 200))  # the whole JSON body just under the cap
            lat = healthz_while(server, lambda: big_chat(server, token, filler), repeats=5)
            rows.append([f"/healthz while a {len(filler) / 2**20:.2f} MiB body is in flight: p50 / max (ms)",
                         f"{statistics.median(lat) * 1e3:.1f} / {max(lat) * 1e3:.1f}", "< 100 ms", max(lat) < 0.1])
            words = context * max_token_chars // 5  # the largest prompt the cheap check lets through
            passing = chat_body(server, "word " * words)
            lat = healthz_while(server, lambda: big_chat(server, token, passing), repeats=2)
            rows.append([f"/healthz while a {words * 5 / 1e3:.0f}k-char prompt is tokenized: p50 / max (ms)",
                         f"{statistics.median(lat) * 1e3:.1f} / {max(lat) * 1e3:.1f}", "< 100 ms", max(lat) < 0.1])

            # 2. RSS before / after random paths
            print(f"2. {args.paths} token-less GETs to random paths")
            random_paths(server, 500)  # warm-up: connection and response pools
            before, size_before = rss_mb(server.proc.pid), len(httpx.get(server.url + "/metrics", timeout=30,
                                                                      headers={"Authorization": f"Bearer {token}"}).text)
            start = time.perf_counter()
            random_paths(server, args.paths)
            took = time.perf_counter() - start
            after, size_after = rss_mb(server.proc.pid), len(httpx.get(server.url + "/metrics", timeout=30,
                                                                    headers={"Authorization": f"Bearer {token}"}).text)
            growth = after / before - 1
            rows.append([f"RSS before / after {args.paths} random-path requests ({took:.0f} s) (MB)",
                         f"{before:.1f} / {after:.1f} ({growth * 100:+.2f}%)", "within 5%", abs(growth) <= 0.05])
            rows.append(["/metrics size before / after (bytes)", f"{size_before} / {size_after}", "flat",
                         size_after - size_before < 1024])

            # 3. CPU after 4 clients disconnect mid-generation
            print("3. 4 clients disconnect mid-generation")
            threads, _, first, stop = streams_in_flight(server, token, 2, max_tokens=300)
            socks = []
            for i in range(2):  # non-streaming: raw requests whose clients will just go away
                body = json.dumps({"model": server.base, "max_tokens": 300, "temperature": 0,
                                   "messages": [{"role": "user", "content": f"Write an essay, part {i}."}]}).encode()
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
                sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
                socks.append(sock)
            wait_in_flight(server, token, 4)
            while not any(event.is_set() for event in first):
                time.sleep(0.05)
            cancelled_before = metric(server, token, "persona_requests_cancelled_total")
            in_flight = metric(server, token, "persona_requests_in_flight")
            stop.set()
            for sock in socks:
                sock.close()
            for t in threads:
                t.join(60)
            time.sleep(2)
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            time.sleep(2)
            cpu = (cpu_seconds(server.proc.pid) - cpu0) / (time.perf_counter() - t0)
            cancelled = metric(server, token, "persona_requests_cancelled_total") - cancelled_before
            rows.append(["server CPU from 2 s to 4 s after 4 clients disconnected (% of one core)", f"{cpu * 100:.1f}",
                         "idle", cpu < 0.05])
            rows.append(["engine rows in flight at the disconnect / cancelled / left after",
                         f"{in_flight:.0f} / {cancelled:.0f} / {metric(server, token, 'persona_requests_in_flight'):.0f}",
                         "4 / 4 / 0", in_flight == cancelled == 4])

            # 4. SIGTERM with requests in flight
            print("4. SIGTERM with 4 streaming requests in flight")
            threads, lines, first, _ = streams_in_flight(server, token, 4, max_tokens=400)
            # In flight = in the engine, running or queued (a request joins the running batch at the
            # engine's next iteration), with at least one generating.
            wait_in_flight(server, token, 4)
            while not any(event.is_set() for event in first):
                time.sleep(0.05)
            start = time.perf_counter()
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            took = time.perf_counter() - start
            for t in threads:
                t.join(30)
            ended = sum(bool(ls) and [x for x in ls if x][-1] == "data: [DONE]" for ls in lines)
            rows.append(["SIGTERM to exit, 4 streams in the engine, --drain-timeout 5 (s)",
                         f"{took:.2f} (exit {server.proc.returncode})", "< 10 s", took < 10 and server.proc.returncode is not None])
            rows.append(["streams ending with [DONE] after SIGTERM", f"{ended} / 4", "4 / 4", ended == 4])
        finally:
            server.close()
    print()
    print(table(["check", "measured", "goal", "met"], rows))


if __name__ == "__main__":
    main()
