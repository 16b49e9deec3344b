"""The gateway (``persona serve --upstream``), for real: persona's own server as the upstream, in
separate processes on loopback, and a small scripted upstream where a test needs to see or hold
what the gateway sends (the headers, a stream held half-way).

Every wait is bounded; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from persona import LoraSettings, Store
from persona.http.relay import SseRelay
from persona.http.upstream import UpstreamSettings, rendezvous_order
from persona.interactions import Interaction
from persona.store import NewVersion
from persona.store.queues import ReplayBuffer
from persona.store.tokens import TokenStore

from conftest import loopback_server

WAIT = 60  # seconds any one wait may take before the test fails (never reached when things work)
ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(root: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PERSONA_UPSTREAM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "persona", "serve", "--store", str(root), "--port", str(port), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"persona serve at {url} did not start"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=WAIT)
    proc.stderr.close()


@pytest.fixture(scope="module")
def fleet(tiny_base, tmp_path_factory):
    """One store, two persona upstreams over it, and a gateway in front of both (three processes)."""
    root = tmp_path_factory.mktemp("gateway") / "adapters"
    store = Store.init(root, base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:bob", 2), ("domain:finance", 3)):
        store.create(ref, LoraSettings(init="random", seed=seed, rank=4))
    tokens = TokenStore(store)
    secrets = {name: tokens.create(subject)[0] for name, subject in
               (("alice", "user:alice"), ("bob", "user:bob"), ("admin", "admin"), ("gateway", "admin"))}
    # Every gateway request reaches an upstream with the gateway's one key: its per-token limit must allow them all.
    upstreams = [start_serve(root, "--max-per-token", "64") for _ in range(2)]
    urls = [url for _, url in upstreams]
    gateway, gateway_url = start_serve(root, "--log-interactions", "--upstream-key", secrets["gateway"],
                                       *[a for url in urls for a in ("--upstream", url)])
    procs = [p for p, _ in upstreams] + [gateway]
    try:
        for proc, url in [*upstreams, (gateway, gateway_url)]:
            wait_healthy(proc, url)
        yield {"store": store, "tokens": secrets, "upstreams": upstreams, "urls": urls, "gateway": gateway_url}
    finally:
        for proc in procs:
            stop(proc)


def post(url: str, token: str | None, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=WAIT)


def streamed(url: str, token: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {token}"}, timeout=WAIT) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def stream_text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e["choices"])


# ------------------------------------------------------------------------- persona as the upstream
def test_gateway_auth_matrix_is_the_servers(fleet):
    gw, t = fleet["gateway"], fleet["tokens"]
    assert post(gw, t["admin"], {**CHAT, "model": "user:alice"}).status_code == 200
    assert post(gw, t["alice"], {**CHAT, "model": "user:alice"}).status_code == 200
    assert post(gw, t["alice"], {**CHAT, "model": "user:alice+domain:finance*0.5"}).status_code == 200
    foreign = post(gw, t["alice"], {**CHAT, "model": "user:bob"})
    unknown = post(gw, t["alice"], {**CHAT, "model": "user:nobody"})
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"
    assert post(gw, t["alice"], {**CHAT, "model": "user:alice+user:bob"}).status_code == 404
    missing = post(gw, None, {**CHAT, "model": "user:alice"})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert post(gw, "psn_nope_nope", {**CHAT, "model": "user:alice"}).status_code == 401
    bad = post(gw, t["alice"], {**CHAT, "model": "user:Alice"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    refused = post(gw, t["alice"], {**CHAT, "model": "user:alice", "tools": [{"type": "function"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"


def test_gateway_answer_is_the_upstreams_answer_for_the_pinned_name(fleet):
    gw, t = fleet["gateway"], fleet["tokens"]
    through = post(gw, t["alice"], {**CHAT, "model": "user:alice"})
    direct = post(fleet["urls"][0], t["admin"], {**CHAT, "model": "user:alice@v1"})
    assert through.status_code == direct.status_code == 200
    assert through.json()["choices"] == direct.json()["choices"] and through.json()["usage"] == direct.json()["usage"]
    assert through.json()["model"] == "user:alice"  # as persona's own server: the name the client sent
    assert through.headers["x-persona-model"] == "user:alice@v1"
    completion = post(gw, t["alice"], {"model": "user:alice", "prompt": "Once", "max_tokens": 4, "temperature": 0},
                      path="/v1/completions")
    plain = post(fleet["urls"][1], t["admin"], {"model": "user:alice@v1", "prompt": "Once", "max_tokens": 4,
                                                "temperature": 0}, path="/v1/completions")
    assert completion.json()["choices"] == plain.json()["choices"]


def test_gateway_streams_the_upstreams_events_with_the_clients_model_name(fleet):
    gw, t = fleet["gateway"], fleet["tokens"]
    body = {**CHAT, "model": "user:alice", "stream_options": {"include_usage": True}}
    through = streamed(gw, t["alice"], body)
    direct = streamed(fleet["urls"][0], t["admin"], {**body, "model": "user:alice@v1"})
    assert through[-1] == direct[-1] == "[DONE]"
    assert stream_text(through) == stream_text(direct) == post(gw, t["alice"], {**CHAT, "model": "user:alice"}).json()[
        "choices"][0]["message"]["content"]
    assert {e["model"] for e in through if isinstance(e, dict)} == {"user:alice"}
    assert through[-2]["usage"] == direct[-2]["usage"] and through[-2]["usage"]["completion_tokens"] > 0


def test_gateway_logs_whole_and_streamed_chats_to_the_users_pending_queue(fleet):
    gw, t, store = fleet["gateway"], fleet["tokens"], fleet["store"]
    before = len(store.take_pending("user:alice").interactions)
    chat = {**CHAT, "messages": [{"role": "user", "content": "remember the gateway"}]}
    whole = post(gw, t["alice"], {**chat, "model": "user:alice"}).json()["choices"][0]["message"]["content"]
    stream = stream_text(streamed(gw, t["alice"], {**chat, "model": "user:alice"}))
    post(gw, t["bob"], {**chat, "model": "user:bob"})
    logged = store.take_pending("user:alice").interactions[before:]
    assert [i.messages[-1][1] for i in logged] == [whole, stream]
    assert all(i.messages[0] == ("user", "remember the gateway") for i in logged)


def test_gateway_models_are_scoped_per_token(fleet):
    gw, t = fleet["gateway"], fleet["tokens"]
    seen = {m["id"] for m in httpx.get(gw + "/v1/models", headers={"Authorization": f"Bearer {t['alice']}"},
                                       timeout=WAIT).json()["data"]}
    assert {"user:alice", "domain:finance"} <= seen and "user:bob" not in seen
    assert httpx.get(gw + "/v1/models/user:bob", headers={"Authorization": f"Bearer {t['alice']}"},
                     timeout=WAIT).status_code == 404
    assert httpx.get(gw + "/v1/models", timeout=WAIT).status_code == 401


def test_gateway_pins_the_new_version_once_it_is_published(fleet):
    gw, t, store = fleet["gateway"], fleet["tokens"], fleet["store"]
    first = post(gw, t["bob"], {**CHAT, "model": "user:bob", "logprobs": True})
    assert first.headers["x-persona-model"] == "user:bob@v1"
    loaded = store.load("user:bob")
    store.publish_version("user:bob", NewVersion({k: v * 3 for k, v in loaded.tensors.items()}, loaded.config, parent=1))
    after = post(gw, t["bob"], {**CHAT, "model": "user:bob", "logprobs": True})
    direct = post(fleet["urls"][0], t["admin"], {**CHAT, "model": "user:bob@v2", "logprobs": True})
    assert after.headers["x-persona-model"] == "user:bob@v2"
    assert after.json()["choices"] == direct.json()["choices"] != first.json()["choices"]


def test_gateway_metrics_count_requests_and_upstream_attempts(fleet):
    gw, t = fleet["gateway"], fleet["tokens"]
    post(gw, t["alice"], {**CHAT, "model": "user:alice"})
    text = httpx.get(gw + "/metrics", headers={"Authorization": f"Bearer {t['admin']}"}, timeout=WAIT).text
    assert 'persona_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "persona_upstream_attempts_total" in text and 'outcome="ok"' in text
    assert "persona_requests_in_flight" in text and "persona_resident_adapters" not in text


def test_gateway_fails_over_when_the_adapters_upstream_is_killed(fleet):
    """Last in this module: it kills one of the fleet's upstreams."""
    gw, t = fleet["gateway"], fleet["tokens"]
    first = rendezvous_order("user:alice", fleet["urls"])[0]
    expected = post(gw, t["alice"], {**CHAT, "model": "user:alice"}).json()["choices"]
    victim = next(proc for proc, url in fleet["upstreams"] if url == first)
    victim.kill()
    victim.wait(timeout=WAIT)
    after = post(gw, t["alice"], {**CHAT, "model": "user:alice"})
    assert after.status_code == 200 and after.json()["choices"] == expected
    assert stream_text(streamed(gw, t["alice"], {**CHAT, "model": "user:alice"})) == expected[0]["message"]["content"]
    text = httpx.get(gw + "/metrics", headers={"Authorization": f"Bearer {t['admin']}"}, timeout=WAIT).text
    assert f'persona_upstream_attempts_total{{outcome="connect_error",upstream="{first}"}}' in text


# -------------------------------------------------------------------------- a scripted upstream
class Scripted:
    """An OpenAI-shaped upstream that records what it was sent and answers as the test says."""

    def __init__(self):
        self.seen: list[dict] = []
        self.status, self.error_body = 200, None
        self.hold: threading.Event | None = None  # a stream waits here after its first event
        self.stopped = threading.Event()  # set when a stream is cut off before its end
        self.unloads: list[dict] = []  # each POST /v1/unload_lora_adapter: its headers and body
        self.unload_status: list[int] = []  # statuses to answer unloads with, in order (then vLLM's: 200 if held)

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def chat(request):
            import anyio

            body = await request.json()
            self.seen.append({"headers": dict(request.headers), "body": body})
            if self.status != 200:
                return JSONResponse(self.error_body, status_code=self.status, headers={"Retry-After": "7"})
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": "one "}, "finish_reason": None}]}
            if not body.get("stream"):
                deadline = time.time() + WAIT
                while self.hold is not None and not self.hold.is_set():
                    assert time.time() < deadline, "the test never released the answer"
                    if await request.is_disconnected():
                        self.stopped.set()
                        return JSONResponse({}, status_code=499)
                    await anyio.sleep(0.01)
                return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"], "usage": None,
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two"},
                                                  "finish_reason": "stop"}]})

            async def events():
                try:
                    yield "data: " + json.dumps(chunk) + "\n\n"
                    deadline = time.time() + WAIT
                    while self.hold is not None and not self.hold.is_set():  # cancellable, unlike a thread's wait
                        assert time.time() < deadline, "the test never released the stream"
                        await anyio.sleep(0.01)
                    yield "data: " + json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": "two"},
                                                                        "finish_reason": "stop"}]}) + "\n\n"
                    yield "data: [DONE]\n\n"
                except BaseException:
                    self.stopped.set()  # the gateway closed the request before the stream ended
                    raise

            return StreamingResponse(events(), media_type="text/event-stream")

        async def unload(request):  # vLLM's: 200 if it holds the name, 404 if not
            body = await request.json()
            self.unloads.append({"headers": dict(request.headers), "body": body})
            held = any(seen["body"]["model"] == body["lora_name"] for seen in self.seen)
            status = self.unload_status.pop(0) if self.unload_status else 200 if held else 404
            return JSONResponse({}, status_code=status)

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/v1/unload_lora_adapter", unload, methods=["POST"])])


@pytest.fixture
def scripted_world(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(init="random", seed=1, rank=4))
    token = TokenStore(store).create("user:alice")[0]
    return store, token


@contextmanager
def gateway_over(store, *urls: str, key: str | None = "up-key", unload_interval_s: float = 10.0, **config):
    from persona.http.gateway import Gateway, create_gateway_app
    from persona.http.state import ServerConfig

    gateway = Gateway(store, UpstreamSettings(urls, api_key=key, cooldown_s=0, unload_interval_s=unload_interval_s))
    app = create_gateway_app(gateway, ServerConfig(**config))
    with loopback_server(app) as url:
        yield url, gateway
    assert app.state.gate.in_flight == 0  # every request gave its admission place back


def wait_until(condition, what: str) -> None:
    deadline = time.time() + WAIT
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_clients_token_never_reaches_the_upstream(scripted_world):
    store, token = scripted_world
    upstream = Scripted()
    with loopback_server(upstream.app()) as up:
        with gateway_over(store, up) as (gw, _):
            assert post(gw, token, {**CHAT, "model": "user:alice"}).json()["model"] == "user:alice"
        with gateway_over(store, up, key=None) as (gw, _):
            post(gw, token, {**CHAT, "model": "user:alice"})
    keyed, keyless = upstream.seen
    assert keyed["headers"]["authorization"] == "Bearer up-key" and "authorization" not in keyless["headers"]
    assert token not in json.dumps(upstream.seen)
    assert keyed["body"] == {**CHAT, "model": "user:alice@v1"}  # the client's body, model pinned


def test_stream_events_reach_the_client_before_the_upstream_finishes(scripted_world):
    store, token = scripted_world
    upstream = Scripted()
    upstream.hold = threading.Event()
    with loopback_server(upstream.app()) as up, gateway_over(store, up) as (gw, _):
        with httpx.stream("POST", gw + "/v1/chat/completions", json={**CHAT, "model": "user:alice", "stream": True},
                          headers={"Authorization": f"Bearer {token}"}, timeout=WAIT) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            # The upstream is still holding its second event: the first came through unbuffered.
            assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "one "
            assert json.loads(first[6:])["model"] == "user:alice"
            upstream.hold.set()
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[0][6:])["choices"][0]["delta"]["content"] == "two"


def test_a_client_that_leaves_mid_stream_closes_the_upstream_request(scripted_world):
    store, token = scripted_world
    upstream = Scripted()
    upstream.hold = threading.Event()  # never set: only the client's leaving can end this stream
    with loopback_server(upstream.app()) as up, gateway_over(store, up) as (gw, gateway):
        with httpx.stream("POST", gw + "/v1/chat/completions", json={**CHAT, "model": "user:alice", "stream": True},
                          headers={"Authorization": f"Bearer {token}"}, timeout=WAIT) as response:
            assert next(line for line in response.iter_lines() if line).startswith("data: {")
        wait_until(upstream.stopped.is_set, "the upstream to see the request closed")
        wait_until(lambda: "persona_requests_in_flight 0.0" in httpx.get(
            gw + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT).text, "the place released")


def test_a_client_that_leaves_before_a_whole_answer_closes_the_upstream_request(scripted_world):
    store, token = scripted_world
    upstream = Scripted()
    upstream.hold = threading.Event()  # the upstream "generates" until the gateway's request goes away
    with loopback_server(upstream.app()) as up, gateway_over(store, up) as (gw, _):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes its connection
            httpx.post(gw + "/v1/chat/completions", json={**CHAT, "model": "user:alice"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(WAIT, read=0.5))
        wait_until(upstream.stopped.is_set, "the upstream to see the request closed")
        wait_until(lambda: "persona_requests_in_flight 0.0" in httpx.get(
            gw + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT).text, "the place released")


def test_upstream_errors_come_back_with_their_status_and_a_refused_key_is_a_502(scripted_world):
    store, token = scripted_world
    upstream = Scripted()
    upstream.status, upstream.error_body = 400, {"error": {"message": "prompt too long", "code": "context_length_exceeded"}}
    with loopback_server(upstream.app()) as up, gateway_over(store, up) as (gw, _):
        passed = post(gw, token, {**CHAT, "model": "user:alice"})
        upstream.status = 429
        busy = post(gw, token, {**CHAT, "model": "user:alice"})
        upstream.status = 401
        refused = post(gw, token, {**CHAT, "model": "user:alice"})
    assert passed.status_code == 400 and passed.json() == upstream.error_body
    assert busy.status_code == 429 and busy.headers["retry-after"] == "7"
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_rejected"


def test_a_gateway_whose_upstream_is_itself_says_so_instead_of_looping_to_a_429(scripted_world, caplog):
    store, token = scripted_world
    admin = TokenStore(store).create("admin")[0]
    with gateway_over(store, "http://127.0.0.1:9") as (gw, gateway):
        gateway.pool.settings = UpstreamSettings((gw,), api_key=admin, cooldown_s=0)  # now it is its own upstream
        answer = post(gw, token, {**CHAT, "model": "user:alice"})
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_rejected"
    assert "leads back to this gateway itself" in caplog.text and admin not in answer.text + caplog.text


def test_no_reachable_upstream_is_a_503_to_retry(scripted_world):
    store, token = scripted_world
    with gateway_over(store, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}") as (gw, _):
        answer = post(gw, token, {**CHAT, "model": "user:alice"})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["code"] == "upstream_unavailable" and "127.0.0.1" not in answer.text


def test_domain_auto_loads_the_router_only_when_asked_and_sends_the_routed_domain(scripted_world):
    store, token = scripted_world
    store.create("domain:finance", LoraSettings(init="random", seed=3, rank=4))
    rows = [Interaction(messages=(("user", f"stock bond dividend {i}"), ("assistant", "finance"))) for i in range(4)]
    store.write_replay("domain:finance", ReplayBuffer(tuple(rows), len(rows)))
    upstream = Scripted()
    with loopback_server(upstream.app()) as up, gateway_over(store, up) as (gw, gateway):
        post(gw, token, {**CHAT, "model": "user:alice"})
        assert not gateway.router_loaded  # no base in memory for plain adapters
        routed = post(gw, token, {**CHAT, "model": "user:alice+domain:auto"})
        assert gateway.router_loaded
    assert routed.status_code == 200 and routed.headers["x-persona-model"] == "user:alice@v1+domain:finance@v1"
    assert upstream.seen[-1]["body"]["model"] == "user:alice@v1+domain:finance@v1"


def test_a_layered_adapter_goes_upstream_as_its_pinned_stack(scripted_world):
    store, _ = scripted_world
    store.create("domain:finance", LoraSettings(init="random", seed=3, rank=4))
    store.create("user:carol", LoraSettings(init="random", seed=4, rank=4), over="domain:finance")
    token = TokenStore(store).create("user:carol")[0]
    upstream = Scripted()
    with loopback_server(upstream.app()) as up, gateway_over(store, up) as (gw, _):
        answer = post(gw, token, {**CHAT, "model": "user:carol*0.5"})
    assert answer.status_code == 200 and answer.json()["model"] == "user:carol*0.5"
    assert upstream.seen[-1]["body"]["model"] == "user:carol@v1*0.5+domain:finance@v1*0.5"


def unloaded_names(upstream: Scripted) -> list[str]:
    return [u["body"]["lora_name"] for u in upstream.unloads]


def test_deleting_an_adapter_unloads_the_names_the_gateway_sent_and_nothing_else(scripted_world):
    store, alice = scripted_world
    store.create("user:bob", LoraSettings(init="random", seed=2, rank=4))
    bob = TokenStore(store).create("user:bob")[0]
    upstream = Scripted()
    with loopback_server(upstream.app()) as up, gateway_over(store, up, unload_interval_s=0.05) as (gw, _):
        for token, model in ((alice, "user:alice"), (bob, "user:bob"), (bob, "user:bob*0.5"), (alice, "base")):
            assert post(gw, token, {**CHAT, "model": model if model != "base" else store.config.base_id}).status_code == 200
        time.sleep(0.3)  # several sweeps with nothing deleted: nothing is unloaded
        assert upstream.unloads == []
        store.delete("user:bob")
        wait_until(lambda: len(upstream.unloads) >= 2, "the deleted adapter's names to be unloaded")
        store.create("user:bob", LoraSettings(init="random", seed=5, rank=4))  # a namesake: v2, never v1 again
        time.sleep(0.3)
        metrics = httpx.get(gw + "/metrics", headers={"Authorization": "Bearer " + TokenStore(store).create("admin")[0]},
                            timeout=WAIT).text
    assert sorted(unloaded_names(upstream)) == ["user:bob@v1", "user:bob@v1*0.5"]  # once each, alice untouched
    assert all(u["headers"]["authorization"] == "Bearer up-key" for u in upstream.unloads)  # the gateway's key
    assert alice not in json.dumps(upstream.unloads) and bob not in json.dumps(upstream.unloads)
    assert 'persona_upstream_unloads_total{outcome="unloaded",upstream="' + up + '"} 2.0' in metrics


def test_an_unload_the_upstream_refused_is_tried_again_and_one_it_does_not_hold_is_dropped(scripted_world):
    store, alice = scripted_world
    upstream = Scripted()
    upstream.unload_status = [503, 503]
    with loopback_server(upstream.app()) as up, gateway_over(store, up, unload_interval_s=0.05) as (gw, gateway):
        assert post(gw, alice, {**CHAT, "model": "user:alice"}).status_code == 200
        gateway.sent.record(up, "user:alice@v1*0.25", store.pin_stack("user:alice*0.25"))  # never sent: 404
        store.delete("user:alice")
        wait_until(lambda: len(gateway.sent) == 0, "every deleted name to be dealt with")
    names = unloaded_names(upstream)
    assert names.count("user:alice@v1") + names.count("user:alice@v1*0.25") == len(names) >= 3  # 2 refused, retried
    assert len(gateway.sent) == 0


def test_a_stack_is_unloaded_when_any_of_its_parts_is_deleted(scripted_world):
    from persona.http.unload import SentNames
    from persona.refs import format_stack

    store, _ = scripted_world
    store.create("domain:finance", LoraSettings(init="random", seed=3, rank=4))
    store.create("user:carol", LoraSettings(init="random", seed=4, rank=4), over="domain:finance")
    sent = SentNames(store)
    names = {}
    for model in ("user:carol", "user:alice+domain:finance*0.3", "user:alice"):
        pinned = store.pin_stack(model)
        names[model] = format_stack(pinned)
        sent.record("http://up:1", names[model], pinned)
    assert sent.gone() == []
    store.delete("domain:finance", cascade=True)  # carol is layered on it: deleted too
    assert sorted(name for _, name in sent.gone()) == sorted([names["user:carol"],
                                                              names["user:alice+domain:finance*0.3"]])


def test_gateway_mode_imports_no_torch(tiny_base, isolated_store):
    Store.init(isolated_store, base=tiny_base)
    probe = ("import sys; from persona import Store; from persona.http.gateway import Gateway, create_gateway_app; "
             "from persona.http.upstream import UpstreamSettings; "
             "create_gateway_app(Gateway(Store.open(), UpstreamSettings(('http://127.0.0.1:9',)))); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- the parts
def test_rendezvous_moves_only_the_new_upstreams_share_when_one_is_added():
    keys = [f"user:u{i}" for i in range(2000)]
    four = [f"http://10.0.0.{i}:8000" for i in range(4)]
    five = [*four, "http://10.0.0.9:8000"]
    before = {k: rendezvous_order(k, four)[0] for k in keys}
    after = {k: rendezvous_order(k, five)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "http://10.0.0.9:8000" for k in moved)  # nothing moves between the old four
    assert 0.15 < len(moved) / len(keys) < 0.25  # about 1/5
    counts = {u: sum(1 for k in keys if before[k] == u) for u in four}
    assert min(counts.values()) > 0.2 * len(keys)  # and the four shared the keys about evenly


def test_rendezvous_order_is_the_same_in_another_process():
    urls = ["http://a:1", "http://b:2", "http://c:3"]
    probe = ("from persona.http.upstream import rendezvous_order; "
             f"print([rendezvous_order(f'user:u{{i}}', {urls!r}) for i in range(50)])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([rendezvous_order(f"user:u{i}", urls) for i in range(50)])


def test_affinity_key_ignores_versions_and_weights(scripted_world):
    from persona.http.gateway import Gateway
    from persona.refs import parse_stack

    gateway = Gateway(scripted_world[0], UpstreamSettings(("http://127.0.0.1:9",)))
    assert gateway.affinity_key(parse_stack("user:alice@v3")) == gateway.affinity_key(parse_stack("user:alice@v4*0.5"))
    assert gateway.affinity_key(()) == gateway.base_name


def test_upstream_urls_are_normalized_and_checked():
    from persona.errors import InvalidConfig

    assert UpstreamSettings(("http://h:8000/v1/", "https://g")).urls == ("http://h:8000", "https://g")
    for bad in (("h:8000",), ("ftp://h",), ()):
        with pytest.raises(InvalidConfig):
            UpstreamSettings(bad)
    with pytest.raises(InvalidConfig):
        UpstreamSettings(("http://h:1", "http://h:1/v1"))


def test_malformed_upstream_urls_are_invalid_config_not_a_crash():
    from persona.errors import InvalidConfig

    for bad in ("http://[::1", "https://h:99999", "http://h:0", "http://h:8000?x=1", "http://h:8000#f", "file:///etc"):
        with pytest.raises(InvalidConfig, match="invalid upstream URL"):
            UpstreamSettings((bad,))


def test_upstream_urls_with_credentials_are_refused_so_they_never_reach_logs_or_metrics(run_cli):
    from persona.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="--upstream-key") as caught:
        UpstreamSettings(("http://user:s3cret@h:8000",))
    assert "s3cret" not in str(caught.value)
    out = run_cli("serve", "--upstream", "http://user:s3cret@127.0.0.1:9", ok=False)
    assert out.exit_code != 0 and "--upstream-key" in out.output and "s3cret" not in out.output


def test_sse_relay_gives_the_same_events_whatever_the_byte_boundaries():
    events = [{"model": "user:a@v2", "choices": [{"index": 0, "delta": {"content": t}}]} for t in ("Hé", "llo")]
    stream = "".join("data: " + json.dumps(e) + "\r\n\r\n" for e in events).encode() + b"data: [DONE]\r\n\r\n"
    whole = SseRelay("user:a", chat=True)
    expected = whole.feed(stream)
    relay = SseRelay("user:a", chat=True)
    pieces = b"".join(relay.feed(stream[i:i + 1]) for i in range(len(stream))) + relay.flush()
    assert pieces == expected and relay.text == whole.text == "Héllo" and relay.finished
    assert expected.count(b'"model": "user:a"') == 2 and expected.endswith(b"data: [DONE]\n\n")
