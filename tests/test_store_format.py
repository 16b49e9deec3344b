"""A store written before issue 12's restructuring (``tests/data/store-v1``) reads back the same.

``tests/data/make_store_fixture.py`` wrote the store with the code of its time and recorded what that
code read back in ``store-v1.expected.json``; each test here reads it with today's code. The store is
copied to a temp dir first: opening and reading take locks and may write (a pending-queue state).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from persona import Store
from persona.store.queues import ReplayBuffer

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = json.loads((DATA / "store-v1.expected.json").read_text())


def _json(value):
    """What ``value`` is once written as JSON (tuples become lists), as the expectations were."""
    return json.loads(json.dumps(value))


@pytest.fixture
def old_store(tmp_path) -> Store:
    root = tmp_path / "store-v1"
    shutil.copytree(DATA / "store-v1", root)
    return Store.open(root)


def test_old_store_lists_and_shows_every_adapter_as_written(old_store):
    assert _json([a.to_dict() for a in old_store.list()]) == EXPECTED["adapters"]
    assert {a.adapter for a in old_store.list()} == {"domain:finance", "merged:team", "user:alice", "user:bob"}
    alice = old_store.show("user:alice")
    assert (alice.current, alice.aliases["stable"], alice.pending, alice.replay) == (2, 1, 3, 12)


def test_old_store_resolves_aliases_and_layers(old_store):
    assert {r: str(old_store.resolve(r)) for r in EXPECTED["resolve"]} == EXPECTED["resolve"]
    bob = old_store.version_info("user:bob")
    assert str(bob.over_ref) == "domain:finance@v1"
    assert sorted(d.adapter for d in old_store.dependents("domain:finance")) == ["merged:team", "user:bob"]


def test_old_store_loads_the_same_weights(old_store):
    for ref, tensors in EXPECTED["weights"].items():
        loaded = old_store.load(ref)
        assert sorted(loaded.tensors) == sorted(tensors)
        for key, (shape, total) in tensors.items():
            assert list(loaded.tensors[key].shape) == shape
            assert float(loaded.tensors[key].double().sum()) == pytest.approx(total, rel=1e-9, abs=1e-12)
    assert sorted(old_store.load_extra("user:alice@v2", "fisher")) == EXPECTED["fisher_keys"]


def test_old_store_verifies_clean(old_store):
    report = old_store.verify()
    assert report.to_dict() == EXPECTED["verify"] and report.ok


def test_old_store_replay_and_pending_queue_read_back(old_store):
    replay = old_store.replay("user:alice")
    assert isinstance(replay, ReplayBuffer)
    assert [i.to_json() for i in replay.items] == EXPECTED["replay"]
    batch = old_store.take_pending("user:alice")  # v2 was trained from data, not the queue: nothing dropped
    assert [i.to_json() for i in batch.interactions] == EXPECTED["pending"]
    assert old_store.replay("user:bob").items == ()


def test_old_store_tokens_authenticate(old_store):
    token = EXPECTED["token"]
    assert [t.to_dict() for t in old_store.tokens.list()] == [
        {k: token[k] for k in ("token_id", "subject", "created")}]
    assert old_store.tokens.authenticate(token["secret"]).subject == "user:alice"


def test_old_store_takes_a_new_version_after_its_last(old_store):
    """Writing continues the old numbering: the format is not only readable but still writable."""
    from persona.store import NewVersion

    loaded = old_store.load("user:alice@v2")
    info = old_store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=2))
    assert info.version == 3 and old_store.verify().ok
