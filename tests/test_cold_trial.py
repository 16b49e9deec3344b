"""Findings of a cold trial of persona, each pinned by a test named for it: JSON and text ``show``
agree on a damaged version, a symlinked adapter folder is listed and deletable (the link only), HTTP
errors name the right param (never a byte offset) and refuse booleans as numbers, ``domain:auto``
with nothing left to pick is a 400 for a caller who may see every part, and a merge is quiet.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import httpx
import pytest

from persona.store import NewVersion
from persona import LoraSettings, Store
from persona.store.tokens import TokenStore

from conftest import loopback_server

RANK = dict(rank=4, init="random")


# ------------------------------------------------------------------------------------ store and CLI
def test_show_json_lists_the_healthy_versions_beside_a_version_copied_from_another_user(run_cli, isolated_store):
    store = Store.open(isolated_store)
    for ref, seed in (("user:alice", 1), ("user:bob", 2)):
        store.create(ref, LoraSettings(seed=seed, **RANK))
    for ref, extra in (("user:alice", 1), ("user:bob", 2)):
        for _ in range(extra):
            loaded = store.load(ref)
            store.publish_version(ref, NewVersion(loaded.tensors, loaded.config, parent=1))
    shutil.copytree(store._adapter_dir("user:bob") / "v0003", store._adapter_dir("user:alice") / "v0003")
    shown = json.loads(run_cli("show", "user:alice", "--json").output)
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert len(shown["damaged"]) == 1 and "user:alice@v0003" in shown["damaged"][0] and "user:bob" in shown["damaged"][0]
    text = run_cli("show", "user:alice").output
    assert "DAMAGED user:alice@v0003" in text and "v0001" in text and "v0002" in text


def test_symlinked_adapter_folder_is_listed_damaged_and_cli_delete_removes_only_the_link(run_cli, isolated_store):
    run_cli("create", "user:alice", "--rank", 2)
    alice_before = run_cli("show", "user:alice", "--json").output
    os.symlink("../user/alice", isolated_store / "user" / "zed")
    listed = {a["adapter"]: a for a in json.loads(run_cli("list", "--json").output)}
    assert listed["user:zed"]["versions"] == 0 and "symlink" in listed["user:zed"]["damaged"][0]
    assert "DAMAGED" in next(line for line in run_cli("list").output.splitlines() if line.startswith("user:zed"))
    assert "symlink" in run_cli("show", "user:zed").output
    assert json.loads(run_cli("delete", "user:zed", "--yes", "--json").output)["deleted"] == ["user:zed"]
    assert not os.path.lexists(isolated_store / "user" / "zed")
    assert run_cli("show", "user:alice", "--json").output == alice_before
    assert "user:zed" not in run_cli("list").output
    assert json.loads(run_cli("verify", "--json").output)["ok"]


def test_merge_does_not_print_peft_missing_base_config_warning(tiny_base, isolated_store, monkeypatch):
    # Offline with an embedded base's name (not a path), PEFT warns that it cannot find the base's
    # config.json each time it reads a state dict; the wrapper reproduces that with the tiny base.
    import peft.utils

    from persona import merge

    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(seed=1, **RANK))
    store.create("domain:finance", LoraSettings(seed=2, **RANK))
    original = peft.utils.get_peft_model_state_dict

    def warning_like_peft(*args, **kwargs):
        warnings.warn("Could not find a config file in smollm2-135m-instruct - will assume that the vocabulary "
                      "was not modified.", UserWarning)
        return original(*args, **kwargs)

    monkeypatch.setattr(peft.utils, "get_peft_model_state_dict", warning_like_peft)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(store, ["user:alice", "domain:finance"], "merged:m", "cat")
    assert not [w for w in caught if "Could not find a config file" in str(w.message)]
    assert store.show("merged:m").versions


# ------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    from persona.serving.engine import Engine
    from persona.http.app import ServerConfig, create_app

    store = Store.init(tmp_path_factory.mktemp("cold-trial-store"), base=tiny_base)
    store.create("domain:finance", LoraSettings(seed=3, **RANK))
    # routable (the centroid router reads the replay buffer's prompts), as a trained domain would be
    from persona.interactions import parse_interactions
    from persona.store.queues import ReplayBuffer

    row = json.dumps({"messages": [{"role": "user", "content": "What is a bond yield?"},
                                   {"role": "assistant", "content": "The return on a bond."}]})
    ReplayBuffer(tuple(parse_interactions([row], source="finance")), 1).write(store._adapter_dir("domain:finance"))
    store.create("user:bob", LoraSettings(seed=2, **RANK))
    store.create("user:carol", over="domain:finance")  # the only domain: domain:auto has nothing else to pick
    tokens = TokenStore(store)
    secrets = {name: tokens.create(subject)[0] for name, subject in
               (("carol", "user:carol"), ("bob", "user:bob"), ("admin", "admin"))}
    engine = Engine(store, max_resident=4, max_batch=8)
    with loopback_server(create_app(engine, ServerConfig(auth=True))) as url:
        yield {"url": url, "tokens": secrets}
    engine.close()


def post(server, path, who="admin", body=None, content=None, content_type="application/json"):
    headers = {"Authorization": f"Bearer {server['tokens'][who]}"}
    if content is None:
        content = json.dumps(body)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(server["url"] + path, content=content, headers=headers, timeout=60)


def error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


CHAT = {"model": "user:bob", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("field", ["max_tokens", "n", "seed", "temperature", "top_p"])
def test_boolean_for_a_number_field_is_a_400_naming_it(server, field):
    got = error(post(server, "/v1/chat/completions", body={**CHAT, field: True}))
    assert got["param"] == field


def test_boolean_logprobs_count_on_completions_is_a_400_naming_it(server):
    body = {"model": "user:bob", "prompt": "Hi", "max_tokens": 2, "logprobs": True}
    assert error(post(server, "/v1/completions", body=body))["param"] == "logprobs"


def test_integer_temperature_is_still_accepted(server):
    assert post(server, "/v1/chat/completions", body={**CHAT, "temperature": 0, "top_p": 1}).status_code == 200


def test_body_sent_without_json_content_type_says_to_send_it(server):
    got = error(post(server, "/v1/chat/completions", content=json.dumps(CHAT),
                     content_type="application/x-www-form-urlencoded"))
    assert "JSON object" in got["message"] and "Content-Type: application/json" in got["message"]
    assert got["param"] is None


def test_json_array_body_says_it_must_be_an_object(server):
    got = error(post(server, "/v1/chat/completions", content="[1, 2]"))
    assert got["message"] == "the body must be a JSON object" and got["param"] is None


def test_malformed_json_has_no_offset_as_param(server):
    got = error(post(server, "/v1/chat/completions", content='{"model": "user:bob", oops}'))
    assert got["param"] is None and "not valid JSON" in got["message"]


def test_empty_completions_prompt_names_the_prompt(server):
    body = {"model": "user:bob", "prompt": "", "max_tokens": 2}
    got = error(post(server, "/v1/completions", body=body))
    assert got["param"] == "prompt" and "empty" in got["message"]


def test_prompt_longer_than_the_context_names_the_prompt(server):
    # under the character cap that refuses before tokenizing, over the context in tokens
    body = {"model": "user:bob", "prompt": "hello " * 600, "max_tokens": 2}
    got = error(post(server, "/v1/completions", body=body))
    assert got["param"] == "prompt" and "context" in got["message"]


@pytest.mark.parametrize("who", ["admin", "carol"])
def test_domain_auto_with_no_domain_left_is_a_400_with_the_reason(server, who):
    body = {**CHAT, "model": "user:carol+domain:auto"}
    got = error(post(server, "/v1/chat/completions", who=who, body=body))
    assert "no domain adapter left to pick" in got["message"] and got["param"] == "model"


def test_domain_auto_over_a_user_the_token_may_not_see_stays_a_404(server):
    body = {**CHAT, "model": "user:carol+domain:auto"}
    got = error(post(server, "/v1/chat/completions", who="bob", body=body), 404)
    assert "left to pick" not in got["message"]
