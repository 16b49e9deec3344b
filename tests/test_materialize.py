"""Materialized cat merges (issue 13): a stack as one plain LoRA folder, equal to the stack, cached by content."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persona import InvalidReference, LoraSettings, Store
from persona.compose.materialize import content_key, materialize
from persona.compose.merge import merge
from persona.errors import AdapterNotFound
from persona.store import NewVersion

IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 8], [7, 8, 9, 10, 11, 12, 13]])


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    # random B (LoRA's default B = 0 would hide a wrong merge), different ranks, alphas and targets
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(init="random", rank=4, seed=1))
    store.create("domain:finance", LoraSettings(init="random", rank=4, alpha=4, seed=2))
    store.create("user:bob", LoraSettings(init="random", rank=8, alpha=8, seed=3, target_modules=("q_proj", "v_proj")))
    store.create("user:carol", LoraSettings(init="random", rank=2, alpha=5, seed=4), over="domain:finance")
    return store


@pytest.fixture
def engine(store, tiny_base):
    from persona.base import load_base
    from persona.serving.engine import Engine

    with Engine(store, base=load_base(tiny_base), max_resident=8) as engine:
        yield engine


def folder_adapter(path: Path) -> tuple[dict, dict]:
    return load_file(str(path / "adapter_model.safetensors")), json.loads((path / "adapter_config.json").read_text())


STACKS = ["user:alice+user:bob*0.5", "user:carol", "user:alice*0.7+domain:finance*1.5+user:bob*0.3", "user:bob*2"]


def test_materialized_merge_equals_the_stack_in_the_engine(store, engine):
    rows = []
    for i, stack in enumerate(STACKS):
        merged = materialize(store, stack)
        tensors, config = folder_adapter(merged.path)
        assert config["r"] == config["lora_alpha"]  # scaling 1: every w * alpha / r is folded into A
        store.create(f"merged:m{i}", tensors=tensors, adapter_config=config)
        rows += [stack, f"merged:m{i}"]
    base = engine.logits(IDS[:1], None, [engine.base_name])[0]
    out = engine.logits(IDS[:1].repeat(len(rows), 1), None, rows)
    for i, stack in enumerate(STACKS):
        got, want = out[2 * i + 1], out[2 * i]
        assert (want - base).abs().max() > 0.05, stack  # the stack does something: equality means something
        assert (got - want).abs().max() < 1e-5, (stack, float((got - want).abs().max()))


def test_layered_adapter_materializes_with_its_pinned_layer(store):
    finance = store.load("domain:finance")
    store.publish_version("domain:finance", NewVersion({k: -v for k, v in finance.tensors.items()}, finance.config, parent=1))
    merged = materialize(store, "user:carol")
    assert merged.name == "user:carol@v0001+domain:finance@v0001"  # the layer pinned at create, not finance's current
    assert merged.key == materialize(store, "user:carol@v1+domain:finance@v1").key  # the same stack, spelled out


def test_same_inputs_find_the_same_folder_built_once(store):
    first = materialize(store, "user:alice+user:bob*0.5")
    again = materialize(store, "user:alice@current+user:bob@v1*0.5")
    assert first.built and not again.built
    assert again.path == first.path and again.path.name == first.key
    assert sorted(p.name for p in first.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                              "manifest.json"]
    # another weight or another order of parts is other content
    assert materialize(store, "user:alice+user:bob*0.25").key != first.key
    assert materialize(store, "user:bob*0.5+user:alice").key != first.key


def test_concurrent_callers_wait_and_reuse_one_build(store):
    results, errors = [], []

    def run():
        try:
            results.append(materialize(store, "user:alice+domain:finance"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert sum(r.built for r in results) == 1 and len({r.path for r in results}) == 1


def test_moved_current_materializes_a_new_folder(store):
    first = materialize(store, "user:alice+user:bob")
    alice = store.load("user:alice")
    store.publish_version("user:alice", NewVersion({k: v * 2 for k, v in alice.tensors.items()}, alice.config, parent=1))
    moved = materialize(store, "user:alice+user:bob")
    assert moved.name == "user:alice@v0002+user:bob@v0001" and first.name == "user:alice@v0001+user:bob@v0001"
    assert moved.key != first.key and moved.path != first.path and first.path.is_dir()


def test_tampered_cache_entry_is_rebuilt_never_served(store):
    first = materialize(store, "user:alice+user:bob")
    weights = first.path / "adapter_model.safetensors"
    good = weights.read_bytes()
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(weights))
    again = materialize(store, "user:alice+user:bob")
    assert again.built and again.path == first.path and weights.read_bytes() == good
    (first.path / "extra.safetensors").write_bytes(b"x")  # a file the manifest does not list
    assert materialize(store, "user:alice+user:bob").built and not (first.path / "extra.safetensors").exists()
    # an entry replaced by a symlink to another folder (which passes its own hash check) is not followed
    other = materialize(store, "domain:finance+user:bob")
    shutil.rmtree(first.path)
    first.path.symlink_to(other.path, target_is_directory=True)
    rebuilt = materialize(store, "user:alice+user:bob")
    assert rebuilt.built and not rebuilt.path.is_symlink() and other.path.is_dir()
    assert (rebuilt.path / "adapter_model.safetensors").read_bytes() == good


def test_deleting_an_adapter_drops_cached_merges_built_from_it(store):
    with_alice = materialize(store, "user:alice+user:bob")
    without = materialize(store, "domain:finance+user:bob")
    layered = materialize(store, "user:carol")
    leftover = with_alice.path.parent / ".tmp-crashed-build"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"weights of anyone")
    store.delete("user:alice")
    assert not with_alice.path.exists() and not leftover.exists()
    assert without.path.is_dir() and layered.path.is_dir()
    store.delete("user:carol")
    assert not layered.path.exists() and without.path.is_dir()
    # no cached file names the deleted users either
    names = "\n".join(str(p) for p in without.path.parent.rglob("*"))
    manifests = "".join(p.read_text() for p in without.path.parent.rglob("manifest.json"))
    assert "alice" not in names + manifests and "carol" not in names + manifests


def test_cat_merge_and_materialize_share_one_arithmetic(store):
    merge(store, ["user:alice", "user:bob"], "merged:ab", "cat", weights=[1.0, 0.5])
    published = store.load("merged:ab")
    tensors, config = folder_adapter(materialize(store, "user:alice+user:bob*0.5").path)
    assert published.tensors.keys() == tensors.keys()
    assert all(torch.equal(published.tensors[k], tensors[k]) for k in tensors)  # bit for bit
    assert published.config["r"] == config["r"] == 12


@pytest.mark.parametrize("model, error", [
    ("user:ghost", AdapterNotFound),
    ("domain:auto", InvalidReference),
    ("user:alice+domain:auto", InvalidReference),
    ("user:Alice!", InvalidReference),
])
def test_refused_references_build_nothing(store, model, error):
    with pytest.raises(error):
        materialize(store, model)
    assert not store.cache_dir("merges").exists() or not any(store.cache_dir("merges").iterdir())


def test_content_key_covers_base_parts_versions_and_weights(store):
    parts = store.pin_stack("user:alice+user:bob*0.5")
    key = content_key(store, parts)
    assert len(key) == 64 and key == content_key(store, store.pin_stack("user:alice@v1+user:bob@v1*0.5"))
    digest = store.version_info("user:alice").files["adapter_model.safetensors"]
    assert hashlib.sha256(digest.encode()).hexdigest() != key  # not just one part's hash


def test_the_merge_cache_is_bounded_and_refuses_a_new_merge_past_its_cap(store, monkeypatch):
    """Every distinct weight is one more entry (a user token may send `domain:finance*0.51`, `*0.52`...):
    past PERSONA_MERGE_CACHE_MAX_BYTES a new merge is refused before a byte is written; cached ones serve."""
    from persona.errors import InvalidConfig, MergeCacheFull

    first = materialize(store, "user:alice+domain:finance*0.5")
    used = sum(f.stat().st_size for f in first.path.iterdir())
    monkeypatch.setenv("PERSONA_MERGE_CACHE_MAX_BYTES", str(used + used // 2))  # room for one more half entry
    entries = sorted(p.name for p in first.path.parent.iterdir())
    with pytest.raises(MergeCacheFull, match="PERSONA_MERGE_CACHE_MAX_BYTES"):
        materialize(store, "user:alice+domain:finance*0.51")
    assert sorted(p.name for p in first.path.parent.iterdir()) == entries  # nothing written, no temp folder left
    again = materialize(store, "user:alice+domain:finance*0.5")
    assert again.path == first.path and not again.built  # what is cached is still served
    monkeypatch.setenv("PERSONA_MERGE_CACHE_MAX_BYTES", "lots")
    with pytest.raises(InvalidConfig, match="whole number of bytes"):
        materialize(store, "user:alice+domain:finance*0.52")
