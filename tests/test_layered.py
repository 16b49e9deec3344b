"""Layered adapters (--over) and warm starts (--from)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from persona.store import NewVersion
from persona import InvalidReference, LoraSettings, Store
from persona.interactions import read_interactions
from persona.lora_runtime import AdapterWeights
from persona.refs import parse_stack
from persona.training.trainer import Trainer, UpdateConfig

from conftest import loopback_server

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
    store.publish_version("domain:finance", NewVersion({k: v * 2 for k, v in loaded.tensors.items()}, loaded.config, parent=1))
    assert store.version_info("user:alice").over_ref == store.resolve("domain:finance@v1")


def test_layered_update_trains_only_the_user_adapter(store):
    store.create("user:alice", over="domain:finance")
    domain_before = digest_tree(store._adapter_dir("domain:finance"))
    trainer = Trainer(store)
    data = read_interactions(EXAMPLES / "alice.jsonl")
    held = trainer.tokenize(data[:8], 96).examples
    # v1 is the identity, so alice@v1 computes exactly what the domain alone computes
    alice_v1 = trainer.evaluate("user:alice", data[:8], ["v1"], max_length=96)[0].loss
    assert alice_v1 == pytest.approx(trainer.loss(held, weights(store, "domain:finance"))[0], abs=1e-6)
    assert alice_v1 != pytest.approx(trainer.loss(held, None)[0], abs=1e-3)  # and differs from the base
    result = trainer.update("user:alice", data, UpdateConfig(epochs=1, max_length=96))
    assert digest_tree(store._adapter_dir("domain:finance")) == domain_before
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


# ---------------------------------------------------------------------------- serving a layered adapter
# Issue 9: training applied the layer, but the engine, the server, `generate` and `eval` served the
# layered adapter alone. Every adapter here is random (LoRA's default init is the identity, which
# would hide a missing layer).
IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 7, 8]])


def random_settings(seed: int) -> LoraSettings:
    return LoraSettings(init="random", rank=4, seed=seed)


@pytest.fixture
def layered(store) -> Store:
    """carol over domain:finance@v1; finance then moves to v2; dave holds carol's weights, unlayered."""
    store.create("user:carol", random_settings(5), over="domain:finance")
    finance = store.load("domain:finance")
    store.publish_version("domain:finance", NewVersion({k: v * -3 for k, v in finance.tensors.items()}, finance.config, parent=1))
    carol = store.load("user:carol")
    store.create("user:dave", tensors=carol.tensors, adapter_config=carol.config)
    store.create("domain:cooking", random_settings(7))
    return store


@pytest.fixture
def engine(layered, tiny_base):
    from persona.base import load_base
    from persona.serving.engine import Engine

    with Engine(layered, base=load_base(tiny_base), max_resident=4) as engine:
        yield engine


def test_layered_adapter_served_with_its_layer_engine(engine):
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    models = ["user:carol", "user:carol+domain:finance@v1", "user:dave", "user:dave+domain:finance@v1",
              "user:carol*0.5", "user:dave*0.5+domain:finance@v1*0.5"]
    carol, explicit, alone, same_math, half, half_explicit = engine.logits(IDS.repeat(len(models), 1), None, models)
    assert (carol - explicit).abs().max() < 1e-5
    assert (carol - same_math).abs().max() < 1e-5  # dave holds carol's weights: the layer is the only difference
    assert (carol - alone).abs().max() > 1e-2  # the bug: carol was served alone
    # the layered adapter and its layer are one unit: the part's weight scales both
    assert (half - half_explicit).abs().max() < 1e-5 and (half - carol).abs().max() > 1e-2
    # the pin recorded at create, not the layer's moving current (v2)
    assert engine.resolve("user:carol") == tuple(parse_stack("user:carol@v1+domain:finance@v1"))
    assert engine.resolve("user:carol*0.5") == tuple(parse_stack("user:carol@v1*0.5+domain:finance@v1*0.5"))
    request = GenerationRequest("user:carol", prompt="Hello", params=SamplingParams(max_new_tokens=4))
    result = engine.generate([request])[0]
    assert result.resolved == ("user:carol@v1", "domain:finance@v1")
    # what `resolved` names computes the same row when sent back
    again = engine.logits(IDS, None, ["+".join(result.resolved)])[0]
    assert (again - carol).abs().max() < 1e-5
    assert engine.stats().resident.count("domain:finance@v1") == 1  # cached under its pin


def test_layered_adapter_in_explicit_stacks(engine, layered):
    assert engine.resolve("user:carol+domain:cooking") == tuple(
        parse_stack("user:carol@v1+domain:finance@v1+domain:cooking@v1"))
    # a stack that names the layer's adapter chooses its version and weight; the layer is not added twice
    assert engine.resolve("user:carol+domain:finance") == tuple(parse_stack("user:carol@v1+domain:finance@v2"))
    assert engine.resolve("user:carol+domain:finance@v1*0.5") == tuple(
        parse_stack("user:carol@v1+domain:finance@v1*0.5"))
    layered.create("user:erin", random_settings(9), over="domain:finance@v1")
    with pytest.raises(InvalidReference, match="both layered on domain:finance"):
        engine.resolve("user:carol+user:erin")
    assert engine.resolve("user:carol+user:erin+domain:finance@v1") == tuple(
        parse_stack("user:carol@v1+user:erin@v1+domain:finance@v1"))


def test_layered_adapter_depth_counts_its_layer(layered, tiny_base):
    from persona import InvalidConfig
    from persona.base import load_base
    from persona.serving.engine import Engine

    with Engine(layered, base=load_base(tiny_base), max_resident=2) as engine:
        assert len(engine.resolve("user:carol")) == 2
        with pytest.raises(InvalidConfig, match="with the layers its adapters were trained on"):
            engine.resolve("user:carol+domain:cooking")
        with pytest.raises(InvalidReference, match="can become 3 adapters"):
            engine.check("user:carol+domain:auto")


def test_layered_adapter_with_domain_auto_never_routes_to_its_layer(engine, layered):
    from persona.interactions import Interaction
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams
    from persona.store.queues import ReplayBuffer

    for domain, words in (("finance", "stock bond dividend"), ("cooking", "pasta garlic oven")):
        items = tuple(Interaction(messages=(("user", f"{words} {i}"), ("assistant", "ok"))) for i in range(4))
        ReplayBuffer(items, len(items)).write(layered._adapter_dir(f"domain:{domain}"))
    request = GenerationRequest("user:carol+domain:auto", prompt="stock bond dividend",
                                params=SamplingParams(max_new_tokens=2))
    assert engine.generate([request])[0].resolved == ("user:carol@v1", "domain:finance@v1", "domain:cooking@v1")


def test_layered_adapter_served_with_its_layer_eval(layered, tiny_base):
    from click.testing import CliRunner

    from persona.cli import main

    trainer = Trainer(layered)
    data = read_interactions(EXAMPLES / "alice.jsonl")[:6]
    held = trainer.tokenize(data, 96).examples
    result = trainer.evaluate("user:carol", data, max_length=96)[0]
    assert result.over == "domain:finance@v1"
    layer = weights(layered, "domain:finance@v1")
    assert result.loss == pytest.approx(trainer.loss(held, weights(layered, "user:carol"), below=[layer])[0], abs=1e-6)
    assert result.loss != pytest.approx(trainer.loss(held, weights(layered, "user:carol"))[0], abs=1e-3)
    data_file = EXAMPLES / "alice.jsonl"
    out = CliRunner().invoke(main, ["eval", "user:carol", "--data", str(data_file), "--max-length", "32", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["over"] == "domain:finance@v1"


def test_layered_adapter_served_with_its_layer_cli_generate(layered, tiny_base):
    from click.testing import CliRunner

    from persona.cli import main

    def generate(model):
        out = CliRunner().invoke(main, ["generate", model, "Hello there", "--json", "--max-new-tokens", "8"])
        assert out.exit_code == 0, out.output
        return json.loads(out.output)

    carol, explicit = generate("user:carol"), generate("user:carol+domain:finance@v1")
    assert carol["resolved"] == ["user:carol@v1", "domain:finance@v1"] == explicit["resolved"]
    assert carol["text"] == explicit["text"] and carol["text"] != generate("user:dave")["text"]


@pytest.fixture
def server(layered, tiny_base):
    """The HTTP server on loopback, with carol's token; frank is layered on a merged (admin-only) adapter."""
    from persona.store.tokens import TokenStore
    from persona.base import load_base
    from persona.serving.engine import Engine
    from persona.http.app import ServerConfig, create_app

    layered.create("merged:team", random_settings(11))
    layered.create("user:frank", random_settings(12), over="merged:team")
    tokens = TokenStore(layered)
    secrets = {who: tokens.create(subject)[0] for who, subject in
               (("carol", "user:carol"), ("frank", "user:frank"), ("admin", "admin"))}
    engine = Engine(layered, base=load_base(tiny_base), max_resident=4)
    with loopback_server(create_app(engine, ServerConfig(auth=True))) as url:
        yield {"url": url, "tokens": secrets, "engine": engine}
    engine.close()


def test_layered_adapter_served_with_its_layer_server(server):
    import httpx

    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    def chat(model, who):
        return httpx.post(server["url"] + "/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {server['tokens'][who]}"},
                          json={"model": model, "messages": [{"role": "user", "content": "Hello there"}],
                                "max_tokens": 8, "temperature": 0})

    def direct(model):
        request = GenerationRequest(model, messages=({"role": "user", "content": "Hello there"},),
                                    params=SamplingParams(max_new_tokens=8, temperature=0.0))
        return server["engine"].generate([request])[0]

    reply = chat("user:carol", "carol")  # a user token reaching its own adapter may use its domain layer
    assert reply.status_code == 200, reply.text
    explicit = direct("user:carol+domain:finance@v1")
    assert reply.json()["choices"][0]["message"]["content"] == explicit.text != direct("user:dave").text
    assert explicit.resolved == direct("user:carol").resolved == ("user:carol@v1", "domain:finance@v1")
    # access checks apply to the layer too: a merged adapter may hold other users' data (admin only)
    assert chat("user:frank", "frank").status_code == 404
    assert chat("user:frank", "admin").status_code == 200
    def listed(who):
        reply = httpx.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {server['tokens'][who]}"},
                          timeout=30)
        return {m["id"] for m in reply.json()["data"]}

    assert "user:frank" not in listed("frank") and "domain:finance" in listed("frank")
    assert "user:carol" in listed("carol") and "user:dave" not in listed("carol")


def test_models_retrieve_checks_the_layer_too(server):
    from openai import NotFoundError, OpenAI

    def api(who):
        return OpenAI(base_url=server["url"] + "/v1", api_key=server["tokens"][who], max_retries=0)

    with pytest.raises(NotFoundError):  # frank's own adapter runs over a merged (admin-only) layer
        api("frank").models.retrieve("user:frank")
    assert api("admin").models.retrieve("user:frank").id == "user:frank"
    assert api("carol").models.retrieve("user:carol").id == "user:carol"
