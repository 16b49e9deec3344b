"""OpenAI request fields through the official client: logprobs, include_usage, response_format,
logit_bias, n, the developer role, text parts, names, models.retrieve, and the field table walked
(every field supported, refused with a 400 naming it, or ignored by design)."""

import json
import re
from pathlib import Path

import httpx
import pytest
import torch

from persona.http.openai_schema import REQUEST_FIELDS
from test_server import CHAT, client, post

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}


def assert_valid(value):
    """SCHEMA checked by hand (no jsonschema dependency)."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "mood", "tags"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 150
    assert value["mood"] in ("happy", "sad")
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3 and all(isinstance(t, bool) for t in value["tags"])


def raw_logprobs(server, prompt_ids):
    """log-softmax of the engine's raw next-token logits after ``prompt_ids`` for user:alice."""
    logits = server["engine"].logits(torch.tensor([prompt_ids]), models=["user:alice"])
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


# ------------------------------------------------------------------------------------ logprobs
def test_logprobs_returned_chat(server):
    reply = client(server).chat.completions.create(model="user:alice", logprobs=True, top_logprobs=3, **CHAT)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    ended_on_eos = choice.finish_reason == "stop"
    assert len(entries) == reply.usage.completion_tokens - ended_on_eos
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one, so its logprob is the best alternative's
        assert entry.logprob == pytest.approx(tops[0]) and entry.token == entry.top_logprobs[0].token
    assert reply.choices[0].message.content == "".join(e.token for e in entries)


def test_logprobs_are_the_models_raw_log_softmax_not_the_tempered_one(server):
    expected = raw_logprobs(server, server["engine"].tokenizer("The sky is")["input_ids"])
    reply = client(server).completions.create(model="user:alice", prompt="The sky is", max_tokens=1, temperature=1.7,
                                              seed=3, logprobs=5)
    lp = reply.choices[0].logprobs
    best = sorted(lp.top_logprobs[0].values(), reverse=True)[:5]  # 5 alternatives, plus the chosen token
    assert best == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
    assert (expected - lp.token_logprobs[0]).abs().min().item() < 1e-4
    tempered = torch.log_softmax(expected / 1.7, dim=-1)
    assert abs(tempered.max().item() - best[0]) > 1e-3


def test_logprobs_streamed_chat_match_the_whole_response(server):
    api = client(server)
    whole = api.chat.completions.create(model="user:alice", logprobs=True, top_logprobs=2, **CHAT).choices[0].logprobs.content
    chunks = list(api.chat.completions.create(model="user:alice", logprobs=True, top_logprobs=2, stream=True, **CHAT))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in whole]


def test_completion_logprobs_legacy_shape_streamed_and_not(server):
    api = client(server)
    args = dict(model="user:alice", prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
    reply = api.completions.create(**args).choices[0]
    lp = reply.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and top[token] == logprob and len(top) <= 3  # 2 alternatives + the chosen one
    assert "".join(lp.tokens) == reply.text
    chunks = list(api.completions.create(stream=True, **args))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_no_logprobs_unless_asked(server):
    reply = client(server).chat.completions.create(model="user:alice", **CHAT)
    assert reply.choices[0].logprobs is None
    assert client(server).completions.create(model="user:alice", prompt="x", max_tokens=2).choices[0].logprobs is None


def test_top_logprobs_without_logprobs_refused_with_param(server):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        client(server).chat.completions.create(model="user:alice", top_logprobs=2, **CHAT)
    assert info.value.param == "top_logprobs"


# ------------------------------------------------------------------------------------ include_usage
def test_include_usage_adds_a_final_usage_chunk(server):
    api = client(server)
    whole = api.chat.completions.create(model="user:alice", **CHAT)
    chunks = list(api.chat.completions.create(model="user:alice", stream=True, stream_options={"include_usage": True}, **CHAT))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(api.chat.completions.create(model="user:alice", stream=True, **CHAT))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_stream_options_without_stream_refused_with_param(server):
    response = post(server, "/v1/chat/completions", {**CHAT, "model": "user:alice", "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


# ------------------------------------------------------------------------------------ response_format
def test_json_schema_response_is_valid_json(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    reply = client(server).chat.completions.create(
        model="user:alice", messages=[{"role": "user", "content": "Describe someone"}], response_format=fmt,
        max_tokens=120, temperature=1.0, seed=5, n=3,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert_valid(json.loads(choice.message.content))
    chunks = list(client(server).chat.completions.create(
        model="user:alice", messages=[{"role": "user", "content": "Hi"}], response_format=fmt, max_tokens=120,
        temperature=0, stream=True))
    assert_valid(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))


def test_unconstrained_output_is_not_json_so_the_schema_test_means_something(server):
    reply = client(server).chat.completions.create(model="user:alice", messages=[{"role": "user", "content": "Describe someone"}],
                                                   max_tokens=30, temperature=0)
    with pytest.raises((ValueError, AssertionError)):  # not JSON, or not this schema's
        assert_valid(json.loads(reply.choices[0].message.content))


def test_json_object_response_is_an_object(server):
    reply = client(server).chat.completions.create(model="user:alice", messages=[{"role": "user", "content": "JSON please"}],
                                                   response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    text = reply.choices[0].message.content
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":  # closed before the budget ran out: it parses
        assert isinstance(json.loads(text), dict)
    text_format = client(server).chat.completions.create(model="user:alice", response_format={"type": "text"}, **CHAT)
    assert text_format.choices[0].message.content == client(server).chat.completions.create(model="user:alice", **CHAT).choices[0].message.content


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema"},
    {"type": "yaml"},
])
def test_bad_response_format_refused_with_param(server, fmt):
    response = post(server, "/v1/chat/completions", {**CHAT, "model": "user:alice", "response_format": fmt})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("response_format")


def test_rows_without_constraints_are_unchanged_by_constrained_neighbours(server):
    from persona.serving.constrain import ResponseFormat
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    engine = server["engine"]
    plain = [GenerationRequest("user:alice", prompt="Once upon", params=SamplingParams(max_new_tokens=8)),
             GenerationRequest("domain:finance", prompt="Rates are", params=SamplingParams(max_new_tokens=8, temperature=0.9, seed=4))]
    alone = engine.generate(plain)
    shaped = [
        GenerationRequest("user:alice", prompt="Hi", params=SamplingParams(max_new_tokens=8, response_format=ResponseFormat.from_schema(SCHEMA))),
        GenerationRequest("user:alice", prompt="Hi", params=SamplingParams(max_new_tokens=8, logit_bias=((5, 100.0),), logprobs=3)),
    ]
    mixed = engine.generate([shaped[0], plain[0], shaped[1], plain[1]])
    assert [r.text for r in (mixed[1], mixed[3])] == [r.text for r in alone]
    assert mixed[0].text.startswith("{") and mixed[1].logprobs is None


# ------------------------------------------------------------------------------------ logit_bias
def test_logit_bias_steers_every_token(server):
    token = server["engine"].tokenizer(" persona", add_special_tokens=False)["input_ids"][0]
    reply = client(server).chat.completions.create(model="user:alice", logit_bias={str(token): 100}, **CHAT)
    assert reply.choices[0].message.content == " persona" * reply.usage.completion_tokens
    response = post(server, "/v1/chat/completions", {**CHAT, "model": "user:alice", "logit_bias": {"99999999": 5}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"


# ------------------------------------------------------------------------------------ messages
def test_developer_role_accepted(server):
    api = client(server)
    as_system = api.chat.completions.create(model="user:alice", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    as_developer = api.chat.completions.create(model="user:alice", max_tokens=6, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_text_content_parts_are_joined_and_other_parts_refused(server):
    api = client(server)
    joined = api.chat.completions.create(model="user:alice", max_tokens=6, temperature=0,
                                         messages=[{"role": "user", "content": "Hello\nthere"}])
    parts = api.chat.completions.create(model="user:alice", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == joined.choices[0].message.content
    response = post(server, "/v1/chat/completions", {**CHAT, "model": "user:alice", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages.0.content" and "image_url" in error["message"]


def test_message_name_accepted(server):
    reply = client(server).chat.completions.create(model="user:alice", max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": "Hi", "name": "carol"}])
    assert reply.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------ models
def test_models_retrieve(server):
    from openai import NotFoundError

    alice = client(server, "alice")
    assert alice.models.retrieve("user:alice").id == "user:alice"
    assert alice.models.retrieve("domain:finance").id == "domain:finance"
    assert alice.models.retrieve(server["engine"].base_name).id == server["engine"].base_name
    for hidden in ("user:bob", "user:nobody", "merged:team"):  # another user's adapter looks like an unknown one
        with pytest.raises(NotFoundError):
            alice.models.retrieve(hidden)
    assert client(server, "admin").models.retrieve("user:bob").id == "user:bob"
    assert httpx.get(server["url"] + "/v1/models/user:alice").status_code == 401


# ------------------------------------------------------------------------------------ n
def test_n_greater_than_one(server):
    api = client(server)
    args = dict(model="user:alice", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0, seed=11)
    reply = api.chat.completions.create(n=3, **args)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # each choice has its own random stream
    one = api.chat.completions.create(**args)
    assert one.choices[0].message.content == texts[0]  # choice 0 uses the seed itself
    assert [c.message.content for c in api.chat.completions.create(n=3, **args).choices] == texts  # reproducible
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    chunks = list(api.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **args))
    streamed = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert streamed == {0: texts[0], 1: texts[1]} and finished == {0, 1}
    legacy = api.completions.create(model="user:alice", prompt="Hi", max_tokens=4, n=2, temperature=1.0, seed=2)
    assert [c.index for c in legacy.choices] == [0, 1]


def test_n_usage_counts_every_completion(server):
    many = client(server).completions.create(model="user:alice", prompt="Hi", max_tokens=5, temperature=1.0, seed=9, n=3,
                                             logprobs=0)
    per_choice = [len(c.logprobs.tokens) + (c.finish_reason == "stop") for c in many.choices]  # + the EOS token
    assert many.usage.completion_tokens == sum(per_choice)
    assert many.usage.total_tokens == many.usage.prompt_tokens + sum(per_choice)


# ------------------------------------------------------------------------------------ the field table
BODIES = {
    "chat": ("/v1/chat/completions", {"model": "user:alice", "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2, "temperature": 0}),
    "completions": ("/v1/completions", {"model": "user:alice", "prompt": "Hi", "max_tokens": 2, "temperature": 0}),
}
NEEDS = {"stream_options": {"stream": True}, "top_logprobs": {"logprobs": True}}
WALK = [(spec, endpoint) for spec in REQUEST_FIELDS for endpoint in spec.endpoints]


@pytest.mark.parametrize("spec,endpoint", WALK, ids=[f"{e}-{s.name}-{s.status}" for s, e in WALK])
def test_every_request_field_is_handled_as_the_table_says(server, spec, endpoint):
    path, base = BODIES[endpoint]
    response = post(server, path, {**base, **NEEDS.get(spec.name, {}), spec.name: spec.example})
    if spec.status == "refused":
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == spec.name and spec.name in error["message"]
        for value in (None, *spec.neutral):  # values that ask for nothing are accepted
            assert post(server, path, {**base, spec.name: value}).status_code == 200, (spec.name, value)
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_unknown_field_refused_with_param(server, endpoint):
    path, base = BODIES[endpoint]
    response = post(server, path, {**base, "frobnicate": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "frobnicate"
    other = "response_format" if endpoint == "completions" else "echo"  # a field of the other endpoint only
    response = post(server, path, {**base, other: {"type": "json_object"} if other == "response_format" else True})
    assert response.status_code == 400 and response.json()["error"]["param"] == other


def test_unsupported_tools_refused_with_param(server):
    from openai import BadRequestError

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(BadRequestError) as info:
        client(server).chat.completions.create(model="user:alice", tools=tools, **CHAT)
    assert info.value.param == "tools"
    with pytest.raises(BadRequestError) as info:
        client(server).completions.create(model="user:alice", prompt="Hi", echo=True, max_tokens=2)
    assert info.value.param == "echo"
    reply = client(server).chat.completions.create(model="user:alice", tool_choice="none", **CHAT)
    assert reply.choices[0].message.content is not None


def test_request_field_table_matches_the_docs():
    doc = (Path(__file__).parent.parent / "docs" / "SERVING.md").read_text()
    rows = set()
    for line in doc.splitlines():
        match = re.match(r"^\| `([a-z_]+)` \| ([a-z, ]+) \| (supported|refused|ignored) \|", line)
        if match:
            rows.add((match[1], tuple(e.strip() for e in match[2].split(",")), match[3]))
    assert rows == {(s.name, s.endpoints, s.status) for s in REQUEST_FIELDS}


# ------------------------------------------------------------------------------------ library
def test_sampling_params_check_logprobs_and_logit_bias():
    from persona.errors import InvalidConfig
    from persona.serving.sampling import SamplingParams

    assert SamplingParams(logit_bias={"5": 1, 7: -2.5}).logit_bias == ((5, 1.0), (7, -2.5))
    assert SamplingParams(logprobs=0).logprobs == 0 and not SamplingParams().shapes_logits
    for bad in (dict(logprobs=21), dict(logprobs=True), dict(logit_bias={"x": 1}), dict(logit_bias={"5": 101}),
                dict(logit_bias={"5": True}), dict(logit_bias={-1: 1}), dict(logit_bias="5"),
                dict(response_format={"type": "json_object"})):
        with pytest.raises(InvalidConfig):
            SamplingParams(**bad)
