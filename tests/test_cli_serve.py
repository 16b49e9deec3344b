"""CLI: tokens, generate, merge + cascading delete (tiny base)."""

import json

import pytest

from persona import Store
from persona.store.tokens import AuthError, TokenStore


@pytest.fixture
def cli(run_cli):
    run = run_cli
    for ref in ("user:alice", "user:bob", "domain:finance"):
        run("create", ref, "--init", "random", "--rank", 4)
    return run


def test_tokens_issue_list_revoke(cli, isolated_store):
    issued = json.loads(cli("token", "create", "user:alice", "--json").stdout)
    assert issued["token"].startswith("psn_") and issued["subject"] == "user:alice"
    tokens = TokenStore(Store.open(isolated_store))
    assert tokens.authenticate(issued["token"]).subject == "user:alice"
    assert issued["token"].split("_")[-1] not in (isolated_store / "tokens.json").read_text()  # stored hashed
    listed = json.loads(cli("token", "list", "--json").stdout)
    assert [t["token_id"] for t in listed] == [issued["token_id"]]
    cli("token", "revoke", issued["token_id"])
    with pytest.raises(AuthError):
        tokens.authenticate(issued["token"])
    assert cli("token", "create", "domain:finance", ok=False).exit_code == 1
    assert cli("token", "create", "user:nobody", ok=False).exit_code == 1
    assert cli("token", "create", ok=False).exit_code == 2


def test_deleting_a_user_revokes_their_tokens(cli, isolated_store):
    alice = json.loads(cli("token", "create", "user:alice", "--json").stdout)["token"]
    bob = json.loads(cli("token", "create", "user:bob", "--json").stdout)["token"]
    cli("delete", "user:alice", "--yes")
    tokens = TokenStore(Store.open(isolated_store))
    with pytest.raises(AuthError):
        tokens.authenticate(alice)
    assert tokens.authenticate(bob).subject == "user:bob"
    assert "alice" not in (isolated_store / "tokens.json").read_text()


def test_generate_json(cli, tiny_base):
    out = json.loads(cli("generate", "user:alice", "Hello", "--max-new-tokens", 5, "--json").stdout)
    assert out["resolved"] == ["user:alice@v1"] and out["completion_tokens"] <= 5
    missing = cli("generate", "user:nobody", "Hello", ok=False)
    assert missing.exit_code == 1 and "user:nobody" in missing.output
    weighted = json.loads(cli("generate", "user:alice+domain:finance*0.5", "Hello", "--max-new-tokens", 3, "--json").stdout)
    assert weighted["resolved"] == ["user:alice@v1", "domain:finance@v1*0.5"]
    assert weighted["model"] == "user:alice+domain:finance*0.5"
    bad = cli("generate", "user:alice*0", "Hello", ok=False)
    assert bad.exit_code == 1 and "greater than 0" in bad.output


def test_chat_takes_a_weighted_stack_and_checks_it_before_the_first_prompt(cli):
    out = cli("chat", "user:alice+domain:finance*0.5", "--max-new-tokens", 2, input="Hello\n\n")
    assert "chatting with user:alice+domain:finance*0.5" in out.output
    for model, message in (("user:alice*0", "greater than 0"), ("user:nobody*0.5", "user:nobody")):
        refused = cli("chat", model, input="Hello\n\n", ok=False)
        assert refused.exit_code == 1 and message in refused.output and "chatting" not in refused.output


def test_merge_then_delete_refuses_without_cascade(cli, isolated_store):
    cli("merge", "user:alice", "domain:finance", "--into", "merged:team", "--method", "cat")
    refused = cli("delete", "user:alice", "--yes", ok=False)
    assert refused.exit_code == 1 and "merged:team" in refused.output and "--cascade" in refused.output
    assert (isolated_store / "user" / "alice").is_dir()
    out = json.loads(cli("delete", "user:alice", "--yes", "--cascade", "--json").stdout)
    assert sorted(out["deleted"]) == ["merged:team", "user:alice"]
    assert not (isolated_store / "merged" / "team").exists() and (isolated_store / "domain" / "finance").is_dir()
