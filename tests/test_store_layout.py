"""The store's layout module: a damaged store raises StoreDamaged, and every store lock, the API
tokens' included, times out with LockTimeout after the store's own timeout (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from persona import IntegrityError, LockTimeout, Store, StoreDamaged
from persona.errors import UnsupportedStoreFormat

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def root(tmp_path) -> Path:
    """A copy of the committed format-1 store (no base model needed to read it)."""
    shutil.copytree(DATA / "store-v1", tmp_path / "store")
    return tmp_path / "store"


@pytest.mark.parametrize("body", ["{not json", json.dumps({"format": 1})])
def test_damaged_persona_json_raises_damaged_store(root, body):
    (root / "persona.json").write_text(body)
    with pytest.raises(StoreDamaged, match="persona.json"):
        Store.open(root)


def test_persona_json_of_another_format_raises_unsupported_store_format(root):
    (root / "persona.json").write_text(json.dumps({"format": 99, "base": {"id": "x", "fingerprint": "y"}}))
    with pytest.raises(UnsupportedStoreFormat, match="format 99"):
        Store.open(root)


def test_damaged_retired_record_raises_damaged_store(root):
    (root / ".retired.json").write_text('{"abc": "not a number"}')
    store = Store.open(root)
    with pytest.raises(StoreDamaged, match="never reused") as caught:
        store.delete("merged:team")
    assert isinstance(caught.value, IntegrityError)  # what it raised before it had its own class
    assert store.exists("merged:team")


def test_token_store_lock_raises_lock_timeout_on_the_stores_timeout(root):
    store = Store(root, lock_timeout=0.2)
    (root / ".locks").mkdir(exist_ok=True)
    with FileLock(str(root / ".locks" / "tokens.lock")):  # held by another writer (filelock is per-object)
        with pytest.raises(LockTimeout, match="API tokens"):
            store.tokens.create("user:alice")
        with pytest.raises(LockTimeout, match="API tokens"):
            store.tokens.revoke("nope")
    assert store.tokens.create("user:alice")[0].startswith("psn_")


def test_adapter_dir_is_private_and_contained(root):
    store = Store.open(root)
    assert not hasattr(store, "adapter_dir")
    assert store._adapter_dir("user:alice") == root.resolve() / "user" / "alice"
