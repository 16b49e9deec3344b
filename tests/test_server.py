"""The HTTP server end to end on loopback: the official openai client, streaming, auth, bad requests."""

import json
import threading

import httpx
import pytest


def client(server, who="alice"):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=server["tokens"][who], max_retries=0)


def post(server, path, body, who="alice", raw=None):
    headers = {"Authorization": f"Bearer {server['tokens'][who]}"} if who else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["url"] + path, content=raw, headers=headers, timeout=60)
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60)


CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0}


def test_openai_client_chat_matches_the_engine(server):
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    reply = client(server).chat.completions.create(model="user:alice", **CHAT)
    text = reply.choices[0].message.content
    direct = server["engine"].generate([GenerationRequest(model="user:alice", messages=({"role": "user", "content": "Hello there"},),
                                                          params=SamplingParams(max_new_tokens=6, temperature=0.0))])[0]
    assert text == direct.text and reply.choices[0].finish_reason == direct.finish_reason
    assert reply.usage.completion_tokens == direct.completion_tokens and reply.model == "user:alice"


def test_weighted_stack_is_served_as_the_engine_computes_it_and_echoed(server):
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    model = "user:alice+domain:finance*0.5"
    reply = client(server).chat.completions.create(model=model, **CHAT)
    direct = server["engine"].generate([GenerationRequest(model=model, messages=({"role": "user", "content": "Hello there"},),
                                                          params=SamplingParams(max_new_tokens=6, temperature=0.0))])[0]
    assert reply.model == model and reply.choices[0].message.content == direct.text
    assert direct.resolved == ("user:alice@v1", "domain:finance@v1*0.5")
    chunks = list(client(server).chat.completions.create(model=model, stream=True, **CHAT))
    assert {c.model for c in chunks} == {model}


def test_answers_name_the_pinned_version_that_ran_in_x_persona_model(server):
    model = "user:alice+domain:finance*0.5"
    assert post(server, "/v1/chat/completions", {**CHAT, "model": model}).headers["x-persona-model"] == \
        "user:alice@v1+domain:finance@v1*0.5"
    with httpx.stream("POST", server["url"] + "/v1/completions", timeout=60,
                      json={"model": "user:alice", "prompt": "The sky is", "max_tokens": 2, "stream": True},
                      headers={"Authorization": f"Bearer {server['tokens']['alice']}"}) as streamed:
        assert streamed.headers["x-persona-model"] == "user:alice@v1"
        streamed.read()


def test_scope_checks_every_part_whatever_its_weight():
    from persona.store.tokens import Scope
    from persona.refs import parse_stack

    alice = Scope("t1", "user:alice")
    assert alice.allows(parse_stack("user:alice*0.5+domain:finance*2"))
    for model in ("user:bob*0.5", "user:alice+user:bob*0.001", "merged:team*0.5", "domain:x+merged:team*1"):
        assert not alice.allows(parse_stack(model)), model
        assert not alice.allows([p.ref for p in parse_stack(model)]), model
    assert Scope("t2", "admin").allows(parse_stack("merged:team*0.5+user:bob"))


def test_streaming_joins_to_the_same_text(server):
    api = client(server)
    full = api.chat.completions.create(model="user:alice+domain:finance", **CHAT).choices[0].message.content
    chunks = list(api.chat.completions.create(model="user:alice+domain:finance", stream=True, **CHAT))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    done = list(api.completions.create(model="user:alice", prompt="The sky is", max_tokens=5, temperature=0, stream=True))
    plain = api.completions.create(model="user:alice", prompt="The sky is", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in done) == plain.choices[0].text


def test_models_lists_only_what_the_token_reaches(server):
    alice = {m.id for m in client(server, "alice").models.list()}
    admin = {m.id for m in client(server, "admin").models.list()}
    base = server["engine"].base_name
    assert alice == {base, "user:alice", "domain:finance"}
    assert admin == {base, "user:alice", "user:bob", "domain:finance"}


@pytest.mark.parametrize("who,model,status", [
    (None, "user:alice", 401),
    ("alice", "user:alice", 200),
    ("alice", "user:bob", 404),          # another user's adapter looks exactly like an unknown one
    ("alice", "user:nobody", 404),
    ("alice", "domain:finance", 200),
    ("alice", "user:alice+domain:finance", 200),
    ("alice", "user:alice+user:bob", 404),
    ("alice", "user:alice+domain:finance*0.5", 200),  # weighted stacks: every part checked, weight or not
    ("alice", "user:alice*2", 200),
    ("alice", "user:bob*0.5", 404),
    ("alice", "user:alice+user:bob*0.01", 404),
    ("alice", "domain:finance*0.5+user:bob", 404),
    ("bob", "user:alice*1+domain:finance", 404),
    ("admin", "user:bob*0.5+domain:finance*2", 200),
    ("bob", "user:bob@v1", 200),
    ("admin", "user:bob", 200),
    ("admin", "user:nobody", 404),       # never a fallback to the base
    ("admin", "user:alice@v9", 404),
])
def test_auth_matrix(server, who, model, status):
    response = post(server, "/v1/chat/completions", {**CHAT, "model": model}, who=who)
    assert response.status_code == status, response.text
    if status != 200:
        assert set(response.json()["error"]) >= {"message", "type", "code"}


def test_every_route_but_healthz_needs_a_token(server):
    assert httpx.get(server["url"] + "/healthz").status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server["url"] + path).status_code == 401
        assert httpx.get(server["url"] + path, headers={"Authorization": "Bearer psn_bad_token"}).status_code == 401
    assert post(server, "/v1/completions", {"model": "user:alice", "prompt": "x"}, who=None).status_code == 401
    assert post(server, "/v1/chat/completions", None, who=None, raw=b"{not json").status_code == 401


@pytest.mark.parametrize("body,raw,fragment", [
    (None, b"{not json", "not valid JSON"),
    ({**CHAT, "model": "user:alice", "max_tokens": "many"}, None, "max_tokens"),
    ({**CHAT, "model": "user:alice", "max_tokens": 10 ** 7}, None, "at most"),
    ({**CHAT, "model": "user:alice@@v1"}, None, "invalid model"),
    ({**CHAT, "model": "user:Alice"}, None, "invalid model"),
    ({**CHAT, "model": "user:alice*0"}, None, "invalid model"),
    ({**CHAT, "model": "user:alice**2"}, None, "invalid model"),
    ({**CHAT, "model": "user:alice*nan"}, None, "plain decimal"),
    ({**CHAT, "model": "user:alice", "n": 17}, None, "n"),
    ({"model": "user:alice", "messages": []}, None, "messages"),
    ({"model": "user:alice", "messages": [{"role": "wizard", "content": "hi"}]}, None, "role"),
    ({**CHAT, "model": "user:alice", "temperature": 9}, None, "temperature"),
])
def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(server, body, raw, fragment):
    response = post(server, "/v1/chat/completions", body, raw=raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert post(server, "/v1/chat/completions", {**CHAT, "model": "user:alice"}).status_code == 200


def test_logged_interactions_reach_the_users_pending_queue(server):
    store = server["store"]
    before = store.show("user:bob").pending
    response = post(server, "/v1/chat/completions", {**CHAT, "model": "user:bob"}, who="bob")
    assert response.status_code == 200
    if not response.json()["choices"][0]["message"]["content"].strip():  # nothing said: nothing to learn from
        assert store.show("user:bob").pending == before
        return
    assert store.show("user:bob").pending == before + 1
    line = (store._adapter_dir("user:bob") / "pending.jsonl").read_text().strip().splitlines()[-1]
    logged = json.loads(line)["messages"]
    assert logged[0] == {"role": "user", "content": "Hello there"} and logged[-1]["role"] == "assistant"
    assert store.show("domain:finance").pending == 0


def test_metrics_are_prometheus_text(server):
    post(server, "/v1/chat/completions", {**CHAT, "model": "user:alice"})
    text = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {server['tokens']['admin']}"}).text
    assert "persona_requests_total" in text and "persona_resident_adapters" in text
    assert "persona_request_seconds_bucket" in text and 'persona_tokens_total{kind="completion"}' in text


def test_concurrent_requests_for_different_users_all_succeed(server):
    results = {}

    def ask(who):
        results[who] = post(server, "/v1/chat/completions", {**CHAT, "model": f"user:{who}"}, who=who).status_code

    threads = [threading.Thread(target=ask, args=(w,)) for w in ("alice", "bob") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {200}
