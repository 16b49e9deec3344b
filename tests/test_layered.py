"""Layered adapters (--over) and warm starts (--from)."""

import hashlib
from pathlib import Path

import pytest
import torch

from persona import InvalidReference, LoraSettings, Store
from persona.data import read_interactions
from persona.layers import AdapterWeights
from persona.train import Trainer, UpdateConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.create("domain:finance", LoraSettings(init="random", rank=4, seed=3))
    return store


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(store, ref):
    loaded = store.load(ref)
    return AdapterWeights.from_peft(loaded.tensors, loaded.config)


def test_over_pins_the_domain_version(store):
    info = store.create("user:alice", over="domain:finance")
    assert info.over["adapter"] == "domain:finance" and info.over["version"] == 1 and len(info.over["sha256"]) == 64
    loaded = store.load("domain:finance")
    store.publish_version("domain:finance", {k: v * 2 for k, v in loaded.tensors.items()}, loaded.config, parent=1)
    assert store.version_info("user:alice").over_ref == store.resolve("domain:finance@v1")


def test_layered_update_trains_only_the_user_adapter(store):
    store.create("user:alice", over="domain:finance")
    domain_before = digest_tree(store.adapter_dir("domain:finance"))
    trainer = Trainer(store)
    data = read_interactions(EXAMPLES / "alice.jsonl")
    held = trainer.tokenize(data[:8], 96).examples
    # v1 is the identity, so alice@v1 computes exactly what the domain alone computes
    alice_v1 = trainer.evaluate("user:alice", data[:8], ["v1"], max_length=96)[0].loss
    assert alice_v1 == pytest.approx(trainer.loss(held, weights(store, "domain:finance"))[0], abs=1e-6)
    assert alice_v1 != pytest.approx(trainer.loss(held, None)[0], abs=1e-3)  # and differs from the base
    result = trainer.update("user:alice", data, UpdateConfig(epochs=1, max_length=96))
    assert digest_tree(store.adapter_dir("domain:finance")) == domain_before
    assert store.version_info(result.version.ref).over["version"] == 1  # still on the same layer
    # the published user weights moved; the gate's baseline included the domain layer
    assert result.metrics["heldout_loss_before"] is not None
    t1, t2 = store.load("user:alice@v1").tensors, store.load("user:alice@v2").tensors
    assert any(not torch.equal(t1[k], t2[k]) for k in t1)


def test_layering_rules(store):
    store.create("user:bob")
    with pytest.raises(InvalidReference, match="another user's adapter"):
        store.create("user:alice", over="user:bob")
    with pytest.raises(InvalidReference, match="only user adapters"):
        store.create("domain:legal", over="domain:finance")
    with pytest.raises(InvalidReference, match="only user adapters"):
        store.create("merged:team", over="domain:finance")
    assert not store.exists("user:alice") and not store.exists("domain:legal") and not store.exists("merged:team")


def test_from_copies_weights_with_lineage(store):
    info = store.create("user:newbie", source="domain:finance")
    src, new = store.load("domain:finance"), store.load("user:newbie")
    assert all(torch.equal(src.tensors[k], new.tensors[k]) for k in src.tensors)
    assert info.lineage == ({"adapter": "domain:finance", "version": 1, "sha256": src.info.files["adapter_model.safetensors"], "relation": "from"},)
    assert info.lora["rank"] == 4
    store.create("user:bob")
    with pytest.raises(InvalidReference, match="holds that user's data"):
        store.create("user:eve", source="user:bob")


def test_cli_create_over_and_from(tiny_base, isolated_store):
    from click.testing import CliRunner
    import json

    from persona.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["init", "--base", tiny_base]).exit_code == 0
    assert runner.invoke(main, ["create", "domain:finance"]).exit_code == 0
    out = runner.invoke(main, ["create", "user:alice", "--over", "domain:finance", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["over"]["adapter"] == "domain:finance"
    out = runner.invoke(main, ["create", "user:bob", "--from", "domain:finance", "--json"])
    assert json.loads(out.output)["lineage"][0]["relation"] == "from"
    bad = runner.invoke(main, ["create", "user:eve", "--over", "user:alice"])
    assert bad.exit_code == 1 and "another user's adapter" in bad.output
