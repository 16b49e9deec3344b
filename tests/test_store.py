import builtins
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from persona.store import NewVersion
from persona import (
    AdapterExists,
    AdapterNotFound,
    BaseMismatch,
    IntegrityError,
    InvalidConfig,
    InvalidName,
    InvalidReference,
    LoraSettings,
    Store,
    StoreExists,
    StoreNotInitialized,
    UnsafeWeightFile,
    VersionNotFound,
)
from persona.store.queues import PENDING, REPLAY

from test_refs import HOSTILE_NAMES


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    return Store.init(isolated_store, base=tiny_base)


@pytest.fixture(scope="session")
def other_base(tiny_base, tmp_path_factory) -> str:
    """Same architecture as tiny_base, different weights: a different fingerprint."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("other-base")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)
    model.save_pretrained(path)
    return str(path)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_open_without_init_says_how_to_fix(isolated_store):
    with pytest.raises(StoreNotInitialized, match="persona init"):
        Store.open(isolated_store)


def test_init_binds_base_and_is_idempotent(store, tiny_base, other_base):
    cfg = store.config
    assert cfg.base_id == tiny_base and cfg.base_fingerprint.startswith("sha256:")
    assert Store.init(store.root, base=tiny_base).config == cfg
    with pytest.raises(StoreExists):
        Store.init(store.root, base=other_base)


def test_create_writes_peft_format_v1(store):
    info = store.create("user:alice", LoraSettings(rank=4, alpha=8))
    assert (info.version, info.parent, info.aliases) == (1, None, ("current",))
    folder = store.root / "user" / "alice" / "v0001"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    loaded = store.load("user:alice")
    # 2 layers x 7 modules x (A, B); B starts at zero so the adapter is the identity.
    assert len(loaded.tensors) == 28
    a = loaded.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = loaded.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)
    assert a.abs().sum() > 0 and b.abs().sum() == 0
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["base_fingerprint"] == store.config.base_fingerprint
    assert set(meta["files"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_create_refuses_duplicates_reserved_and_pinned(store):
    store.create("user:alice")
    with pytest.raises(AdapterExists):
        store.create("user:alice")
    with pytest.raises(InvalidName, match="reserved"):
        store.create("domain:auto")
    with pytest.raises(InvalidReference):
        store.create("user:bob@v2")


def test_settings_reject_unknown_keys_and_bad_targets(store):
    with pytest.raises(InvalidConfig, match="unknown LoRA setting"):
        LoraSettings.from_dict({"rank": 4, "rnak": 3})
    with pytest.raises(InvalidConfig):
        LoraSettings(rank=0)
    with pytest.raises(InvalidConfig, match="not found"):
        store.create("user:alice", LoraSettings(target_modules=("q_proj", "no_such_proj")))
    assert not store.exists("user:alice")


def test_same_seed_same_weights(store):
    store.create("user:a", LoraSettings(seed=3))
    store.create("user:b", LoraSettings(seed=3))
    store.create("user:c", LoraSettings(seed=4))
    ta, tb, tc = (store.load(f"user:{n}").tensors for n in "abc")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_publish_allocates_next_version_and_moves_aliases(store):
    store.create("user:alice")
    base = store.load("user:alice")
    tensors = {k: v + 1 for k, v in base.tensors.items()}
    v2 = store.publish_version("user:alice", NewVersion(tensors, base.config, parent=1, metrics={"loss": 1.5}))
    assert (v2.version, v2.parent, v2.metrics["loss"]) == (2, 1, 1.5)
    assert store.resolve("user:alice").version == 2
    v3 = store.publish_version("user:alice", NewVersion(tensors, base.config, parent=2), set_alias="candidate")
    assert store.resolve("user:alice").version == 2
    assert store.resolve("user:alice@candidate").version == 3 == v3.version
    loaded = store.load("user:alice@v2")
    assert all(torch.equal(loaded.tensors[k], tensors[k]) for k in tensors)
    with pytest.raises(VersionNotFound):
        store.publish_version("user:alice", NewVersion(tensors, base.config, parent=9))


def test_alias_rollback_and_missing_versions(store):
    store.create("user:alice")
    loaded = store.load("user:alice")
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1))
    store.rollback("user:alice", "v1")
    assert store.resolve("user:alice").version == 1
    store.set_alias("user:alice", "stable", 2)
    assert store.resolve("user:alice@stable").version == 2
    assert store.show("user:alice").aliases == {"current": 1, "stable": 2}
    with pytest.raises(VersionNotFound):
        store.rollback("user:alice", "v7")
    with pytest.raises(VersionNotFound):
        store.resolve("user:alice@nosuch")
    with pytest.raises(VersionNotFound):
        store.load("user:alice@v5")
    store.remove_alias("user:alice", "stable")
    assert "stable" not in store.aliases("user:alice")
    with pytest.raises(AdapterNotFound):
        store.resolve("user:nobody")


def test_delete_purges_every_file(store):
    store.create("user:alice")
    store.create("user:bob")
    folder = store.root / "user" / "alice"
    (folder / PENDING).write_text('{"text": "pending"}\n')
    (folder / REPLAY).write_text('{"text": "replay"}\n')
    store.delete("user:alice")
    assert not folder.exists()
    assert not any("alice" in p for p in tree(store.root))
    with pytest.raises(AdapterNotFound):
        store.load("user:alice")
    assert [a.adapter for a in store.list()] == ["user:bob"]


def test_flipped_byte_caught_by_verify_and_refused_at_load(store):
    store.create("user:alice", LoraSettings(init="random"))
    store.create("user:bob")
    weights = store.root / "user" / "alice" / "v0001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    report = store.verify()
    assert not report.ok
    assert [(p.adapter, p.version, p.path) for p in report.problems] == [("user:alice", 1, "adapter_model.safetensors")]
    with pytest.raises(IntegrityError, match="sha256"):
        store.load("user:alice")
    store.load("user:bob")  # others are unaffected
    assert store.verify("user:bob").ok


def test_adapter_from_another_base_is_refused(store, other_base, tmp_path):
    foreign = Store.init(tmp_path / "foreign", base=other_base)
    foreign.create("user:mallory")
    shutil.copytree(foreign.root / "user" / "mallory", store.root / "user" / "mallory")
    with pytest.raises(BaseMismatch, match="another base"):
        store.load("user:mallory")
    assert any("another base" in p.reason for p in store.verify().problems)
    store.create("user:alice")
    with pytest.raises(BaseMismatch):
        store.load("user:alice", base_fingerprint=foreign.config.base_fingerprint)


def test_pickle_weight_file_is_never_opened(store, monkeypatch):
    store.create("user:alice")
    folder = store.root / "user" / "alice" / "v0001"
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    opened = []
    real_open = builtins.open

    def spying_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(builtins, "open", spying_open)
    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(UnsafeWeightFile, match="pickle"):
        store.load("user:alice")
    report = store.verify()
    assert not any(p.endswith(".bin") for p in opened)
    assert any(p.path == "adapter_model.bin" and "pickle" in p.reason for p in report.problems)


def test_hostile_names_rejected_by_api_and_nothing_written_outside(store, tmp_path):
    outside_before = tree(tmp_path)
    for name in HOSTILE_NAMES:
        for kind in ("user", "domain"):
            with pytest.raises((InvalidName, InvalidReference)):
                store.create(f"{kind}:{name}")
        with pytest.raises((InvalidName, InvalidReference, ValueError)):
            store.delete(f"user:{name}")
    assert tree(tmp_path) == outside_before


def test_symlinked_adapter_escaping_root_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "user").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, store.root / "user" / "evil")
    with pytest.raises(InvalidName, match="outside the store root"):
        store.create("user:evil")
    assert list(outside.iterdir()) == []


def test_crashed_create_leftovers_do_not_block_or_show(store):
    (store.root / "user" / "ghost" / "v0001").mkdir(parents=True)  # no refs.json: never published
    assert store.list() == []
    with pytest.raises(AdapterNotFound):
        store.show("user:ghost")
    assert store.create("user:ghost").version == 1


def test_peft_loads_our_version_with_the_same_weights(store, tiny_base):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    store.create("user:alice", LoraSettings(init="random", rank=4))
    folder = store.root / "user" / "alice" / "v0001"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder))
    ours = store.load("user:alice").tensors
    theirs = get_peft_model_state_dict(model)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_show_and_list_report_versions(store):
    store.create("user:alice")
    store.create("domain:finance")
    assert [a.adapter for a in store.list()] == ["user:alice", "domain:finance"]
    assert [a.adapter for a in store.list("domain")] == ["domain:finance"]
    info = store.show("user:alice")
    assert info.current == 1 and len(info.versions) == 1 and info.pending == 0
    assert info.to_dict()["versions"][0]["label"] == "v0001"


def test_recreated_adapter_never_reuses_a_version_label(store):
    """A version label names one set of weights forever (engines and caches key on it), so a
    re-created adapter starts after its deleted namesake's last version, and no file names it."""
    store.create("user:alice", LoraSettings(init="random", seed=1))
    store.publish_version("user:alice", NewVersion(*_weights_of(store, "user:alice"), parent=1))
    store.delete("user:alice")
    assert not any("alice" in p for p in tree(store.root))
    info = store.create("user:alice", LoraSettings(init="random", seed=2))
    assert (info.version, store.version_numbers("user:alice")) == (3, [3])
    assert store.load("user:alice").info.version == 3 and store.verify().ok
    store.create("user:bob")
    assert store.version_numbers("user:bob") == [1]  # other names are unaffected


def test_damaged_retired_record_is_refused_not_ignored(store):
    store.create("user:alice")
    store.delete("user:alice")
    (store.root / ".retired.json").write_text("[1, 2")
    with pytest.raises(IntegrityError, match="never reused"):
        store.create("user:alice")
    assert not store.exists("user:alice")


def _weights_of(store, ref):
    loaded = store.load(ref)
    return dict(loaded.tensors), dict(loaded.config)
