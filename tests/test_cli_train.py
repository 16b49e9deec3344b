"""End-to-end CLI: log, update (data, pending, --all), eval, show — on the tiny base."""

import json
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
FAST = ["--epochs", "1", "--max-length", "96"]


@pytest.fixture
def cli(run_cli):
    run = run_cli
    run("create", "user:alice", "--rank", 4)
    run("create", "user:bob", "--rank", 4)
    return run


def test_update_with_data_then_show_and_eval(cli):
    out = json.loads(cli("update", "user:alice", "--data", EXAMPLES / "alice.jsonl", *FAST, "--json").stdout)
    assert out["version"] == 2 and out["parent"] == 1 and out["alias"] == "current"
    assert out["metrics"]["heldout_loss_after"] < out["metrics"]["heldout_loss_before"]
    shown = cli("show", "user:alice").output
    assert "v0002 [current] parent=v1" in shown and "gate: promoted" in shown
    evals = json.loads(cli("eval", "user:alice", "--data", EXAMPLES / "alice.jsonl", "--versions", "v1,v2,base",
                           "--max-length", 96, "--json").stdout)
    assert [e["version"] for e in evals] == ["v0001", "v0002", "base"]
    assert evals[1]["loss"] < evals[0]["loss"]
    text = cli("eval", "user:alice", "--data", EXAMPLES / "alice.jsonl", "--max-length", 96).output
    assert "v0002" in text and "PPL" in text


def test_log_then_update_from_pending_and_all(cli, isolated_store):
    out = json.loads(cli("log", "user:alice", "--data", EXAMPLES / "alice.jsonl", "--json").stdout)
    assert out == {"adapter": "user:alice", "logged": 51, "pending": 51}
    cli("log", "user:bob", "--data", EXAMPLES / "bob.jsonl")
    results = json.loads(cli("update", "--all", *FAST, "--json").stdout)
    assert sorted(r["adapter"] for r in results) == ["user:alice", "user:bob"]
    listed = {a["adapter"]: a for a in json.loads(cli("list", "--json").stdout)}
    assert listed["user:alice"]["pending"] == 0 and listed["user:bob"]["versions"] == 2
    nothing = cli("update", "user:alice", *FAST, ok=False)
    assert nothing.exit_code == 1 and "no pending interactions" in nothing.output
    assert "no adapter has pending" in cli("update", "--all", *FAST).output


def test_bad_data_is_one_clear_line_and_writes_nothing(cli, isolated_store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    before = sorted(str(p) for p in isolated_store.rglob("*") if ".locks" not in str(p))
    for args in (("update", "user:alice", "--data", bad), ("log", "user:alice", "--data", bad)):
        result = cli(*args, *FAST if args[0] == "update" else (), ok=False)
        assert result.exit_code == 1 and "bad.jsonl:1" in result.output and "assistant" in result.output
        assert "Traceback" not in result.output
    assert sorted(str(p) for p in isolated_store.rglob("*") if ".locks" not in str(p)) == before


def test_usage_errors(cli):
    assert cli("update", *FAST, ok=False).exit_code == 2  # neither REF nor --all
    assert cli("update", "user:alice", "--all", *FAST, ok=False).exit_code == 2
    missing = cli("update", "user:nobody", "--data", EXAMPLES / "alice.jsonl", ok=False)
    assert missing.exit_code == 1 and "persona create user:nobody" in missing.output
