"""Training side files stay out of what a PEFT loader reads (issue 13, section 2).

LoRAX and TGI load every ``*.safetensors`` at the top of an adapter folder into one dict; an EWC
Fisher stored as ``fisher.safetensors``, keyed like the adapter, overwrote the LoRA tensors there.
Side files are now ``NAME.train`` (safetensors bytes under a name no such glob matches); versions
written before keep ``fisher.safetensors`` and still load, verify and feed EWC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from persona import LoraSettings, Store
from persona.compose.merge import merge
from persona.interactions import read_interactions
from persona.training.trainer import Trainer, UpdateConfig

DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
EWC = dict(epochs=1, batch_size=4, max_length=48, seed=0, reg="ewc", fisher_samples=4, force=True)


def lorax_style_load(folder: Path) -> dict[str, torch.Tensor]:
    """What LoRAX/TGI do with a local adapter folder: every top-level ``*.safetensors``, into one dict."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def version_folder(store: Store, ref: str) -> Path:
    pinned = store.resolve(ref)
    return store._version_dir(pinned, pinned.version)


def assert_loader_gets_the_lora_tensors(store: Store, ref: str) -> None:
    truth = store.load(ref).tensors
    seen = lorax_style_load(version_folder(store, ref))
    assert sorted(seen) == sorted(truth), ref
    for key, tensor in truth.items():
        assert torch.equal(seen[key], tensor), (ref, key)


def test_a_safetensors_globbing_loader_gets_the_true_lora_tensors_of_every_version_kind(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    small = LoraSettings(rank=2, alpha=4, init="random", seed=1)
    store.create("domain:finance", small)
    store.create("user:alice", small)                                   # plain (create)
    store.create("user:bob", small, over="domain:finance")              # layered (create --over)
    trainer = Trainer(store)
    interactions = read_interactions(EXAMPLES / "alice.jsonl")[:12]
    trainer.update("user:alice", interactions, UpdateConfig(**EWC))     # updated with EWC: v2 holds a Fisher
    trainer.update("user:bob", interactions[:8], UpdateConfig(**EWC))   # a layered update with EWC too
    merge(store, ["domain:finance", "user:alice"], "merged:team", "cat")  # merge

    ewc = store.version_info("user:alice@v2")
    assert set(ewc.files) == {"adapter_config.json", "adapter_model.safetensors", "fisher.train", "heldout.train"}
    fisher = store.load_extra("user:alice@v2", "fisher")
    assert fisher is not None and sorted(fisher) == sorted(store.load("user:alice@v2").tensors)  # the clash it was
    for ref in ("user:alice@v1", "user:alice@v2", "domain:finance", "user:bob@v1", "user:bob@v2", "merged:team"):
        assert_loader_gets_the_lora_tensors(store, ref)
    assert store.verify().ok


def test_a_tampered_side_file_is_found_by_verify_and_refused_by_load_extra(tiny_base, isolated_store):
    from persona.errors import IntegrityError
    from persona.store import NewVersion

    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(rank=2, init="random"))
    loaded = store.load("user:alice")
    ones = {k: torch.ones_like(v) for k, v in loaded.tensors.items()}
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1, extra_files={"fisher": ones}))
    side = version_folder(store, "user:alice@v2") / "fisher.train"
    side.write_bytes(side.read_bytes()[:-4] + b"\0\0\0\0")
    problems = store.verify().problems
    assert [(p.path, "sha256 mismatch" in p.reason) for p in problems] == [("fisher.train", True)]
    with pytest.raises(IntegrityError):
        store.load_extra("user:alice@v2", "fisher")


def test_side_file_names_are_plain_names_without_a_suffix(tiny_base, isolated_store):
    from persona.errors import InvalidName
    from persona.store import NewVersion

    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(rank=2))
    loaded = store.load("user:alice")
    for bad in ("fisher.safetensors", "../fisher", "Fisher"):
        with pytest.raises(InvalidName):
            store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1,
                                                           extra_files={bad: dict(loaded.tensors)}))
    assert store.version_numbers("user:alice") == [1]


@pytest.fixture
def old_store(tmp_path, tiny_base) -> Store:
    """The frozen format-1 store (its user:alice@v2 has fisher.safetensors), rebound to the tiny base it was
    made on (same seed and config: same fingerprint) so that it can be trained."""
    root = tmp_path / "store-v1"
    shutil.copytree(DATA / "store-v1", root)
    config = json.loads((root / "persona.json").read_text())
    config["base"]["id"] = tiny_base
    (root / "persona.json").write_text(json.dumps(config))
    store = Store.open(root)
    assert store.config.base_fingerprint == Store.init(tmp_path / "probe", base=tiny_base).config.base_fingerprint
    return store


def test_an_old_ewc_version_still_loads_verifies_and_feeds_the_next_ewc_update(old_store, monkeypatch):
    assert "fisher.safetensors" in old_store.version_info("user:alice@v2").files
    old_fisher = old_store.load_extra("user:alice@v2", "fisher")
    assert old_fisher is not None and sorted(old_fisher) == sorted(old_store.load("user:alice@v2").tensors)
    assert old_store.verify().ok

    read = []
    real = Store.load_extra
    monkeypatch.setattr(Store, "load_extra", lambda self, ref, name: read.append((str(ref), name)) or real(self, ref, name))
    estimated = []
    trainer = Trainer(old_store)
    real_fisher = trainer._fisher
    monkeypatch.setattr(trainer, "_fisher", lambda weights, pool, *a, **k: estimated.append(len(pool)) or real_fisher(
        weights, pool, *a, **k))
    result = trainer.update("user:alice", read_interactions(EXAMPLES / "alice-2.jsonl")[:8], UpdateConfig(**EWC))
    assert ("user:alice@v2", "fisher") in read
    assert len(estimated) == 1  # only the new version's Fisher: the parent's was read, not estimated
    info = old_store.version_info(result.version.ref)
    assert info.training["reg_applied"] == "ewc" and "fisher.train" in info.files
    assert old_store.verify().ok
