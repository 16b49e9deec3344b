"""Hostile input to the HTTP server (issue 10, items 1-4; issue 9, item 4): no request can stall or
bloat the server, a client that goes away stops its generation, every error is OpenAI-shaped JSON.

Everything runs on loopback against the tiny model. Where a test needs a request "in the middle"
(tokenizing, generating), the engine is held there by an event, not by timing: each wait is bounded
and the assertions are about state (handles, counters, labels), never about how long things took.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from persona import LoraSettings, Store
from persona.store.tokens import TokenStore

WAIT = 30  # seconds any single wait may take before the test fails (never reached when things work)
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from more threads, and on a busy machine OpenMP spinning makes them slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    """One store and engine for the module; each test starts its own server with its own limits."""
    from persona.serving.engine import Engine

    store = Store.init(tmp_path_factory.mktemp("hostile-store"), base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:bob", 2)):
        store.create(ref, LoraSettings(init="random", seed=seed, rank=4))
    tokens = TokenStore(store)
    secrets = {"alice": tokens.create("user:alice")[0], "bob": tokens.create("user:bob")[0],
               "admin": tokens.create("admin")[0]}
    engine = Engine(store, max_resident=4, max_batch=8)
    yield {"store": store, "engine": engine, "tokens": secrets}
    engine.close()


@contextmanager
def running(world, **limits):
    """A server on loopback over the module's engine, with these ``ServerConfig`` fields."""
    from persona.http.app import ServerConfig, make_server

    port = free_port()
    srv = make_server(world["engine"], "127.0.0.1", port, ServerConfig(**limits), log_level="warning")
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + WAIT
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "server": srv, "app": srv.config.app}
    finally:
        srv.should_exit = True
        thread.join(timeout=WAIT)


def auth(world, who="alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {world['tokens'][who]}"}


class EngineHold:
    """Holds the engine inside a decode step (the second forward of a batch) until released, and
    records every handle the server submits."""

    def __init__(self, engine, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        self.handles = []
        forward, submit = engine._forward, engine.submit
        calls = {"n": 0}

        def held_forward(*args, **kwargs):
            calls["n"] += 1
            if kwargs.get("cache") is not None and args[0].shape[1] == 1:  # a decode step, not the prefill
                self.entered.set()
                assert self.release.wait(WAIT), "the test never released the engine"
            return forward(*args, **kwargs)

        def recorded_submit(request):
            handle = submit(request)
            self.handles.append(handle)
            return handle

        monkeypatch.setattr(engine, "_forward", held_forward)
        monkeypatch.setattr(engine, "submit", recorded_submit)

    def wait_entered(self) -> None:
        assert self.entered.wait(WAIT), "the engine never reached a decode step"


def wait_until(predicate, what: str) -> None:
    deadline = time.time() + WAIT
    while not predicate():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def raw_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> socket.socket:
    """Send one HTTP/1.1 POST on a raw socket and return the socket (to read from, or to drop)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def label_values(metrics_text: str) -> set[str]:
    return set(re.findall(r'persona_requests_total\{route="([^"]*)"', metrics_text))


# ------------------------------------------------------------------------------------- 1. metrics
def test_random_paths_do_not_grow_the_metrics_label_set(world):
    rng = random.Random(0)
    with running(world) as srv, httpx.Client(base_url=srv["url"], timeout=WAIT) as http:
        def scrape() -> str:
            return http.get("/metrics", headers=auth(world, "admin")).text

        def hammer(n: int) -> None:
            for i in range(n):
                path = "/p" + "".join(rng.choice("abcdefghij/%._-") for _ in range(rng.randint(1, 40)))
                headers = auth(world) if i % 3 == 0 else {}  # token-less (401) and authenticated (404) alike
                http.request(rng.choice(["GET", "POST", "DELETE"]), path, headers=headers)

        hammer(100)
        first = scrape()
        hammer(300)
        second = scrape()
    assert label_values(first) == label_values(second)
    routes = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/healthz", "/openapi.json"}
    assert "unmatched" in label_values(second) and label_values(second) <= routes | {"unmatched"}
    assert len(second.splitlines()) == len(first.splitlines())  # the exposition did not grow at all


def test_probed_model_names_never_reach_metrics(world):
    """Regression (cold trial): 404s of ``GET /v1/models/{model}`` were labelled with the raw path,
    so /metrics showed every token holder which adapter names others had probed."""
    with running(world) as srv, httpx.Client(base_url=srv["url"], timeout=WAIT) as http:
        for name in ("user:bob", "user:secretname1", "user:..%2Fbob", "user:\u0430lice"):
            assert http.get(f"/v1/models/{name}", headers=auth(world)).status_code in (400, 404)
        text = http.get("/metrics", headers=auth(world, "admin")).text
    assert 'route="/v1/models/{model:path}",status="404"' in text
    assert "secretname1" not in text and "user:bob" not in text


def test_unauthenticated_requests_are_labelled_by_route_template(world):
    with running(world) as srv:
        assert httpx.get(srv["url"] + "/v1/models").status_code == 401
        assert httpx.get(srv["url"] + "/no/such/route").status_code == 401
        text = httpx.get(srv["url"] + "/metrics", headers=auth(world, "admin")).text
    assert 'persona_requests_total{route="/v1/models",status="401"}' in text
    assert 'persona_requests_total{route="unmatched",status="401"}' in text
    assert "/no/such/route" not in text


def test_engine_totals_are_counters_not_gauges(world):
    with running(world) as srv:
        assert httpx.post(srv["url"] + "/v1/chat/completions", json={**CHAT, "model": "user:alice"},
                          headers=auth(world), timeout=WAIT).status_code == 200
        text = httpx.get(srv["url"] + "/metrics", headers=auth(world, "admin")).text
    types = dict(re.findall(r"# TYPE (\S+) (\S+)", text))
    for name in ("persona_adapter_loads", "persona_adapter_evictions", "persona_adapter_cpu_hits",
                 "persona_requests_cancelled"):
        assert types.get(f"{name}_total") == "counter", (name, types)
        assert re.search(rf"^{name}_total \d", text, re.M), name
    assert types["persona_resident_adapters"] == "gauge" and types["persona_requests_in_flight"] == "gauge"
    loads = float(re.search(r"^persona_adapter_loads_total (\S+)", text, re.M).group(1))
    assert loads == world["engine"].stats().loads >= 1


# ------------------------------------------------------------------------------- 2. body size, loop
def test_body_over_the_cap_is_a_413_before_it_is_read(world):
    import persona.cli  # noqa: F401 - cli_serve is imported through it
    from persona.cli.serve import MAX_BODY_BYTES as CLI_DEFAULT
    from persona.http.app import MAX_BODY_BYTES

    assert CLI_DEFAULT == MAX_BODY_BYTES
    big = json.dumps({**CHAT, "model": "user:alice", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    with running(world, max_body_bytes=64 * 1024) as srv:
        declared = httpx.post(srv["url"] + "/v1/chat/completions", content=big, timeout=WAIT,
                              headers={**auth(world), "Content-Type": "application/json"})
        chunked = httpx.post(srv["url"] + "/v1/chat/completions", timeout=WAIT,
                             content=(big[i:i + 8192] for i in range(0, len(big), 8192)),  # no Content-Length
                             headers={**auth(world), "Content-Type": "application/json"})
        after = httpx.post(srv["url"] + "/v1/chat/completions", json={**CHAT, "model": "user:alice"},
                           headers=auth(world), timeout=WAIT)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large" and "65536 bytes" in response.json()["error"]["message"]
    assert after.status_code == 200


def test_prompt_longer_than_the_context_can_hold_is_refused_without_tokenizing(world, monkeypatch):
    engine = world["engine"]
    admitted = []
    admit = engine._admit
    monkeypatch.setattr(engine, "_admit", lambda *a, **k: admitted.append(1) or admit(*a, **k))
    chars = engine.context_length * 100  # more than any token of this vocabulary spells, times the context
    with running(world) as srv:
        chat = httpx.post(srv["url"] + "/v1/chat/completions", headers=auth(world), timeout=WAIT,
                          json={**CHAT, "model": "user:alice", "messages": [{"role": "user", "content": "a " * (chars // 2)}]})
        plain = httpx.post(srv["url"] + "/v1/completions", headers=auth(world), timeout=WAIT,
                           json={"model": "user:alice", "prompt": "b" * chars, "max_tokens": 2})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    assert chat.json()["error"]["param"] == "messages" and plain.json()["error"]["param"] == "prompt"
    assert plain.status_code == 400 and not admitted  # the tokenizer never saw either prompt


def test_healthz_answers_while_a_request_is_being_tokenized(world, monkeypatch):
    engine = world["engine"]
    inside, release = threading.Event(), threading.Event()
    admit = engine._admit

    def slow_admit(*args, **kwargs):  # a tokenizer busy with a huge prompt, for as long as the test likes
        inside.set()
        assert release.wait(WAIT)
        return admit(*args, **kwargs)

    monkeypatch.setattr(engine, "_admit", slow_admit)
    body = {**CHAT, "model": "user:alice", "messages": [{"role": "user", "content": "word " * 5_000}]}
    with running(world) as srv:
        results = {}
        thread = threading.Thread(target=lambda: results.update(r=httpx.post(
            srv["url"] + "/v1/chat/completions", json=body, headers=auth(world), timeout=WAIT)))
        thread.start()
        try:
            assert inside.wait(WAIT)
            health = httpx.get(srv["url"] + "/healthz", timeout=10)  # answered while the request tokenizes
            models = httpx.get(srv["url"] + "/v1/models", headers=auth(world, "bob"), timeout=10)
        finally:
            release.set()
            thread.join(WAIT)
    assert health.status_code == 200 and health.json()["status"] == "ok" and models.status_code == 200
    assert results["r"].status_code == 400 and "context" in results["r"].json()["error"]["message"]


# ----------------------------------------------------------------------- 3. disconnects and limits
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_mid_generation_cancels_the_engine_row(world, monkeypatch, stream):
    engine = world["engine"]
    hold = EngineHold(engine, monkeypatch)
    before = engine.stats().cancelled
    body = json.dumps({**CHAT, "model": "user:alice", "max_tokens": 300, "stream": stream}).encode()
    with running(world) as srv:
        sock = raw_request(srv["port"], "/v1/chat/completions", body, auth(world))
        try:
            hold.wait_entered()  # the row is generating: held inside a decode step
            (handle,) = hold.handles
            assert not handle.cancelled
            sock.close()  # the client goes away
            wait_until(lambda: handle.cancelled, "the server to cancel the request")
        finally:
            hold.release.set()
        wait_until(handle.done, "the engine to stop the row")
    assert isinstance(handle.error, CancelledError)  # stopped at the next decode step, not run to 300 tokens
    assert engine.stats().cancelled == before + 1


def test_full_queue_answers_429_with_retry_after(world, monkeypatch):
    hold = EngineHold(world["engine"], monkeypatch)
    with running(world, max_queue=1) as srv:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=httpx.post(
            srv["url"] + "/v1/chat/completions", json={**CHAT, "model": "user:alice"}, headers=auth(world), timeout=WAIT)))
        thread.start()
        try:
            hold.wait_entered()
            refused = httpx.post(srv["url"] + "/v1/chat/completions", json={**CHAT, "model": "user:bob"},
                                 headers=auth(world, "bob"), timeout=WAIT)
        finally:
            hold.release.set()
            thread.join(WAIT)
        wait_until(lambda: srv["app"].state.gate.in_flight == 0, "the first request to leave the gate")
        again = httpx.post(srv["url"] + "/v1/chat/completions", json={**CHAT, "model": "user:bob"},
                           headers=auth(world, "bob"), timeout=WAIT)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "in flight" in refused.json()["error"]["message"]
    assert first["r"].status_code == 200 and again.status_code == 200


def test_one_token_over_its_concurrency_limit_gets_429_others_are_served(world, monkeypatch):
    hold = EngineHold(world["engine"], monkeypatch)
    results = {}

    def ask(name, who):
        results[name] = httpx.post(srv["url"] + "/v1/chat/completions", json={**CHAT, "model": f"user:{who}"},
                                   headers=auth(world, who), timeout=WAIT)

    with running(world, max_per_token=1, max_queue=8) as srv:
        threads = [threading.Thread(target=ask, args=("alice-1", "alice"))]
        threads[0].start()
        try:
            hold.wait_entered()
            ask("alice-2", "alice")  # alice already has her one request in flight
            threads.append(threading.Thread(target=ask, args=("bob", "bob")))
            threads[1].start()
            wait_until(lambda: len(hold.handles) == 2, "bob's request to be admitted")
        finally:
            hold.release.set()
            for t in threads:
                t.join(WAIT)
    assert results["alice-2"].status_code == 429 and "retry-after" in results["alice-2"].headers
    assert "per-token" in results["alice-2"].json()["error"]["message"]
    assert results["alice-1"].status_code == 200 and results["bob"].status_code == 200


def test_shutdown_drains_then_cancels_the_rows_still_running(world, monkeypatch):
    """What SIGTERM does, in-process: uvicorn waits drain_timeout_s, then the rows are cancelled."""
    engine = world["engine"]
    hold = EngineHold(engine, monkeypatch)
    before = engine.stats().cancelled
    with running(world, drain_timeout_s=0.2) as srv:
        sock = raw_request(srv["port"], "/v1/chat/completions",
                           json.dumps({**CHAT, "model": "user:alice", "max_tokens": 300}).encode(), auth(world))
        try:
            hold.wait_entered()
            (handle,) = hold.handles
            srv["server"].should_exit = True  # as the signal handler does
            wait_until(lambda: handle.cancelled, "the drain deadline to cancel the request")
        finally:
            hold.release.set()
        answer = sock.makefile("rb").read().decode()  # the server answers, then closes the connection
        sock.close()
    wait_until(handle.done, "the engine to stop the row")
    assert isinstance(handle.error, CancelledError) and engine.stats().cancelled == before + 1
    assert answer.startswith("HTTP/1.1 503") and '"code":"server_stopping"' in answer


def test_sigterm_stops_a_serving_process_with_a_request_in_flight(tiny_base, tmp_path):
    root = tmp_path / "store"
    Store.init(root, base=tiny_base)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "persona", "serve", "--store", str(root), "--port", str(port),
                             "--no-auth", "--drain-timeout", "0.5"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                base = httpx.get(url + "/healthz", timeout=2).json()["base"]
                break
            except httpx.HTTPError:
                assert time.time() < deadline, "persona serve did not start"
                time.sleep(0.2)
        streaming, ended = threading.Event(), threading.Event()
        lines: list[str] = []

        def client():
            body = {**CHAT, "model": base, "max_tokens": 400, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=WAIT) as response:
                    for line in response.iter_lines():
                        lines.append(line)
                        streaming.set()
            finally:
                streaming.set()
                ended.set()

        threading.Thread(target=client, daemon=True).start()
        assert streaming.wait(WAIT)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # bounded: before the fix it hung for minutes
        assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read().decode()
        assert ended.wait(WAIT)
        assert [line for line in lines if line][-1] == "data: [DONE]"  # finished, or cut at the deadline: well-formed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------- 4. errors are JSON, always
@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", '{"model": "user:alice", "max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}',
     "messages.0.content"),
    ("/v1/completions", '{"model": "user:alice", "max_tokens": 2, "prompt": "hi \\udfff there"}', "prompt"),
    ("/v1/chat/completions", '{"model": "user:alice", "max_tokens": 2, "stop": ["\\ud800"], '
                             '"messages": [{"role": "user", "content": "hi"}]}', "stop.0"),
])
def test_lone_surrogate_is_a_400_naming_the_param_and_the_connection_survives(world, path, body, param):
    with running(world) as srv, httpx.Client(base_url=srv["url"], timeout=WAIT) as http:
        refused = http.post(path, content=body.encode(), headers={**auth(world), "Content-Type": "application/json"})
        after = http.post("/v1/chat/completions", json={**CHAT, "model": "user:alice"}, headers=auth(world))
    assert refused.status_code == 400 and refused.headers["content-type"].startswith("application/json")
    error = refused.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_unicode" and "surrogate" in error["message"]
    assert after.status_code == 200  # same keep-alive connection, still served


def test_unhandled_error_is_an_openai_shaped_500_without_internals_and_logged(world, monkeypatch, caplog):
    engine = world["engine"]

    def broken_submit(request):
        raise RuntimeError("secret detail at /srv/internal/path")

    monkeypatch.setattr(engine, "submit", broken_submit)
    caplog.set_level(logging.ERROR, logger="persona.http.app")
    with running(world) as srv, httpx.Client(base_url=srv["url"], timeout=WAIT) as http:
        for stream in (False, True):
            response = http.post("/v1/chat/completions", json={**CHAT, "model": "user:alice", "stream": stream},
                                 headers=auth(world))
            assert response.status_code == 500 and "secret" not in response.text
            assert response.json()["error"]["type"] == "server_error"
        assert http.get("/healthz").status_code == 200
    logged = [r for r in caplog.records if r.name == "persona.http.app" and r.exc_info]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


def test_an_error_in_the_middle_of_a_stream_ends_it_with_an_error_event(world, monkeypatch, caplog):
    engine = world["engine"]
    submit = engine.submit

    def breaking_submit(request):
        handle = submit(request)

        def stream(*args, **kwargs):  # the role chunk is out when the engine's stream breaks
            raise RuntimeError("secret detail")
            yield

        handle.stream = stream
        return handle

    monkeypatch.setattr(engine, "submit", breaking_submit)
    caplog.set_level(logging.ERROR, logger="persona.http.app")
    with running(world) as srv:
        response = httpx.post(srv["url"] + "/v1/chat/completions", headers=auth(world), timeout=WAIT,
                              json={**CHAT, "model": "user:alice", "stream": True})
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1] == "[DONE]" and "secret" not in response.text
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert any(r.exc_info for r in caplog.records if r.name == "persona.http.app")


def test_admission_gate_holds_a_place_until_the_request_ends():
    from persona.http.admission import AdmissionGate
    from persona.serving.requests import GenerationRequest, Handle
    from persona.errors import Overloaded

    gate = AdmissionGate(max_total=3, max_per_key=2)
    handles = [Handle(GenerationRequest("user:alice", prompt="x"), ()) for _ in range(3)]
    for handle in handles[:2]:
        gate.admit("alice").watch(handle)
    with pytest.raises(Overloaded, match="per-token"):
        gate.admit("alice")
    gate.admit(None).watch(handles[2])  # no token: only the total applies
    with pytest.raises(Overloaded, match="in flight"):
        gate.admit("bob")
    handles[0].fail(RuntimeError("done"))  # a request that ends gives its place back, once
    handles[0].fail(RuntimeError("again"))
    assert gate.in_flight == 2
    gate.admit("bob").release()
    assert gate.cancel_all() == 2 and all(h.cancelled for h in handles[1:])


def test_n_choices_hold_one_place_until_every_choice_ends(world):
    with running(world, max_per_token=1) as srv:
        response = httpx.post(srv["url"] + "/v1/chat/completions", headers=auth(world), timeout=WAIT,
                              json={**CHAT, "model": "user:alice", "n": 3})
        wait_until(lambda: srv["app"].state.gate.in_flight == 0, "the request to leave the gate")
    assert response.status_code == 200 and len(response.json()["choices"]) == 3
