"""Merging adapters (PEFT's add_weighted_adapter behind persona's checks) and lineage-aware deletion."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from persona.store import NewVersion
from persona import BaseMismatch, InvalidConfig, InvalidReference, LoraSettings, Store
from persona.cli.main import PersonaGroup
from persona.cli.compose import COMMANDS
from persona.compose.merge import METHODS, merge
from persona.lora_runtime import Activation, AdapterWeights, LoraRuntime
from persona.store import AdapterHasDependents

IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 8], [7, 8, 9, 10, 11, 12, 13]])
KW = {"linear": {}, "cat": {}, "svd": {"rank": 6}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
      "dare_ties": {"density": 0.5}}


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(init="random", rank=4, seed=1))
    store.create("domain:finance", LoraSettings(init="random", rank=4, alpha=4, seed=2))
    store.create("user:bob", LoraSettings(init="random", rank=8, alpha=8, seed=3, target_modules=("q_proj", "v_proj")))
    return store


@pytest.fixture(scope="module")
def model(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    return model, LoraRuntime.attach(model)


def weights(store, ref) -> AdapterWeights:
    loaded = store.load(ref)
    return AdapterWeights.from_peft(loaded.tensors, loaded.config)


def logits(model, activations):
    model, runtime = model
    with torch.no_grad(), runtime.activate(activations):
        return model(IDS).logits


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- merging
def test_cat_merge_equals_stacking_with_weights(store, model):
    # different ranks, alphas and target modules: cat is exact whatever they are
    info = merge(store, ["user:alice", "user:bob"], "merged:ab", "cat", weights=[0.7, -0.4])
    stacked = logits(model, [Activation(weights(store, "user:alice"), weight=0.7), Activation(weights(store, "user:bob"), weight=-0.4)])
    merged = logits(model, [Activation(weights(store, "merged:ab"))])
    base = logits(model, [])
    assert (stacked - base).abs().max() > 0.1  # the parents do something, so equality means something
    assert torch.allclose(merged, stacked, atol=1e-4, rtol=0), float((merged - stacked).abs().max())
    config = store.load("merged:ab").config
    assert config["r"] == 12 and config["lora_alpha"] == 12  # sum of ranks; scaling folded in (alpha == r)
    assert info.lora["rank"] == 12 and set(info.lora["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}


def test_svd_at_full_rank_is_exact_and_lower_rank_truncates(store, model):
    stacked = logits(model, [Activation(weights(store, "user:alice")), Activation(weights(store, "domain:finance"))])
    merge(store, ["user:alice", "domain:finance"], "merged:full", "svd", rank=8)  # 4 + 4: no information lost
    assert torch.allclose(logits(model, [Activation(weights(store, "merged:full"))]), stacked, atol=1e-4, rtol=0)
    info = merge(store, ["user:alice", "domain:finance"], "merged:low", "svd", rank=2)
    assert info.lora["rank"] == 2 and store.load("merged:low").config["r"] == 2
    assert not torch.allclose(logits(model, [Activation(weights(store, "merged:low"))]), stacked, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_publishes_an_adapter_peft_loads(store, tiny_base, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info = merge(store, ["user:alice", "domain:finance"], f"merged:{method.replace('_', '-')}", method, **KW[method])
    folder = store._adapter_dir(info.adapter) / info.label
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(IDS).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(IDS).logits
    rank = {"cat": 8, "svd": 6}.get(method, 4)
    assert store.load(info.adapter).config["r"] == rank == info.lora["rank"]
    assert (theirs - plain).abs().max() > 1e-3  # the merged adapter is not a no-op
    # persona's runtime computes what PEFT computes for the merged adapter
    ours_model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    runtime = LoraRuntime.attach(ours_model)
    with torch.no_grad(), runtime.activate([Activation(weights(store, info.adapter))]):
        ours = ours_model(IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_lineage_names_every_parent_version_sha_and_weight(store):
    loaded = store.load("user:alice")
    store.publish_version("user:alice", NewVersion({k: v * 2 for k, v in loaded.tensors.items()}, loaded.config, parent=1))
    info = merge(store, ["user:alice", "domain:finance@v1"], "merged:team", "ties", weights=[0.6, 0.4], density=0.3)
    parents = {(e["adapter"], e["version"]): e for e in info.lineage}
    assert set(parents) == {("user:alice", 2), ("domain:finance", 1)}
    alice, finance = parents[("user:alice", 2)], parents[("domain:finance", 1)]
    assert alice["sha256"] == store.version_info("user:alice@v2").files["adapter_model.safetensors"]
    assert finance["sha256"] == store.version_info("domain:finance@v1").files["adapter_model.safetensors"]
    assert (alice["weight"], finance["weight"]) == (0.6, 0.4)
    assert all(e["method"] == "ties" and e["density"] == 0.3 and e["relation"] == "merge" for e in info.lineage)
    meta = json.loads((store._adapter_dir("merged:team") / "v0001" / "meta.json").read_text())
    assert meta["lineage"] == [dict(e) for e in info.lineage]
    assert store.verify().ok
    # merging again publishes the next version of the merged adapter, with its own lineage
    again = merge(store, ["user:alice@v1", "domain:finance"], "merged:team", "linear")
    assert (again.version, again.parent) == (2, None)
    assert [(e["adapter"], e["version"], e["method"]) for e in again.lineage] == [("user:alice", 1, "linear"), ("domain:finance", 1, "linear")]
    assert store.resolve("merged:team").version == 2


def test_dare_is_reproducible_by_seed(store):
    a = merge(store, ["user:alice", "domain:finance"], "merged:a", "dare_linear", density=0.5, seed=7)
    b = merge(store, ["user:alice", "domain:finance"], "merged:b", "dare_linear", density=0.5, seed=7)
    c = merge(store, ["user:alice", "domain:finance"], "merged:c", "dare_linear", density=0.5, seed=8)
    sha = lambda info: info.files["adapter_model.safetensors"]  # noqa: E731
    assert sha(a) == sha(b) != sha(c)


@pytest.mark.parametrize(
    "parents, into, method, kwargs, error, message",
    [
        (["user:alice"], "merged:x", "cat", {}, InvalidConfig, "2 to 16 parent"),
        (["user:alice", "domain:finance"], "merged:x", "cat", {"weights": [1.0]}, InvalidConfig, "1 weight\\(s\\) for 2 parents"),
        (["user:alice", "domain:finance"], "merged:x", "cat", {"weights": [1.0, float("nan")]}, InvalidConfig, "finite"),
        (["user:alice", "domain:finance"], "user:x", "cat", {}, InvalidReference, "merged:NAME"),
        (["user:alice", "domain:finance"], "merged:x@v2", "cat", {}, InvalidReference, "not a version"),
        (["user:alice", "user:alice@v1"], "merged:x", "cat", {}, InvalidReference, "same version"),
        (["user:alice", "domain:finance"], "merged:x", "magic", {}, InvalidConfig, "unknown merge method"),
        (["user:alice", "domain:finance"], "merged:x", "ties", {}, InvalidConfig, "needs --density"),
        (["user:alice", "domain:finance"], "merged:x", "dare_ties", {"density": 1.5}, InvalidConfig, "density must be in"),
        (["user:alice", "domain:finance"], "merged:x", "cat", {"density": 0.5}, InvalidConfig, "density applies to"),
        (["user:alice", "domain:finance"], "merged:x", "linear", {"rank": 4}, InvalidConfig, "rank applies to svd only"),
        (["user:alice", "domain:finance"], "merged:x", "svd", {"rank": 1000}, InvalidConfig, "exceeds the smallest"),
        (["user:alice", "user:bob"], "merged:x", "linear", {}, InvalidConfig, "equal ranks"),
        (["user:alice", "user:ghost"], "merged:x", "cat", {}, KeyError, "no adapter user:ghost"),
    ],
)
def test_bad_merges_are_refused_and_publish_nothing(store, parents, into, method, kwargs, error, message):
    with pytest.raises(error, match=message):
        merge(store, parents, into, method, **kwargs)
    assert store.list("merged") == []


def test_different_targets_refused_for_factor_methods(store):
    store.create("domain:qv", LoraSettings(init="random", rank=4, seed=5, target_modules=("q_proj", "v_proj")))
    with pytest.raises(InvalidConfig, match="adapt the same modules.*cat or svd"):
        merge(store, ["user:alice", "domain:qv"], "merged:x", "ties", density=0.5)
    info = merge(store, ["user:alice", "domain:qv"], "merged:x", "svd")  # svd allows it
    assert info.lora["rank"] == 4 and info.lineage[0]["rank"] == 4  # the default rank, recorded as used


def test_parent_from_another_base_is_refused(store):
    meta_path = store._adapter_dir("domain:finance") / "v0001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "sha256:" + "0" * 64  # as if copied in from a store on another base
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BaseMismatch, match="another base"):
        merge(store, ["user:alice", "domain:finance"], "merged:x", "cat")
    assert not store.exists("merged:x")


def test_parent_with_shapes_that_do_not_fit_the_base_is_refused(store):
    loaded = store.load("user:alice")
    key = next(k for k in loaded.tensors if k.endswith("q_proj.lora_A.weight"))
    bad = dict(loaded.tensors)
    bad[key] = bad[key][:, :-1].contiguous()
    # create refuses such weights now (issue 13); a version published before that, or by hand, still must not merge
    store.create("user:odd", tensors=loaded.tensors, adapter_config=loaded.config)
    store.publish_version("user:odd", NewVersion(bad, loaded.config, parent=1))
    with pytest.raises(InvalidConfig, match="q_proj has A \\(4, 63\\).*needs A \\(4, 64\\)"):
        merge(store, ["user:alice", "user:odd"], "merged:x", "cat")
    config = dict(loaded.config, use_rslora=True)
    store.create("user:rs", tensors=loaded.tensors, adapter_config=loaded.config)
    store.publish_version("user:rs", NewVersion(loaded.tensors, config, parent=1))
    with pytest.raises(InvalidConfig, match="use_rslora.*peft#3761"):
        merge(store, ["user:alice", "user:rs"], "merged:x", "cat")
    assert not store.exists("merged:x")


# ---------------------------------------------------------------------------------------- CLI
def cli():
    runner = CliRunner()
    group = PersonaGroup(name="persona", commands={c.name: c for c in COMMANDS})

    def run(*args):
        return runner.invoke(group, [str(a) for a in args], catch_exceptions=False)

    return run


def test_cli_merge(store):
    run = cli()
    out = run("merge", "user:alice", "domain:finance", "--into", "merged:af", "--method", "cat", "--weights", "1,0.5", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["adapter"] == "merged:af" and [e["weight"] for e in data["lineage"]] == [1.0, 0.5]
    out = run("merge", "user:alice", "domain:finance", "--into", "merged:af", "--method", "ties", "--density", "0.5")
    assert out.exit_code == 0 and "merged:af@v0002" in out.output and "ties" in out.output
    bad = run("merge", "user:alice", "domain:finance", "--into", "merged:x", "--method", "cat", "--weights", "1")
    assert bad.exit_code == 1 and "1 weight(s) for 2 parents" in bad.output
    bad = run("merge", "user:alice", "domain:finance", "--into", "merged:x", "--method", "cat", "--weights", "1,x")
    assert bad.exit_code == 2 and "comma-separated numbers" in bad.output


# ---------------------------------------------------------------------------------------- deletion
def test_delete_refuses_while_merges_derive_from_the_adapter_then_cascades(store):
    merge(store, ["user:alice", "domain:finance"], "merged:af", "cat")
    merge(store, ["merged:af", "user:bob"], "merged:team", "svd", rank=4)  # derived from alice through merged:af
    merge(store, ["domain:finance", "user:bob"], "merged:fb", "cat")  # not derived from alice
    untouched = {ref: digest_tree(store._adapter_dir(ref)) for ref in ("domain:finance", "user:bob", "merged:fb")}
    before = digest_tree(store.root / "user" / "alice")

    with pytest.raises(AdapterHasDependents, match="merged:af.*merged:team|merged:team.*merged:af") as refused:
        store.delete("user:alice")
    assert set(refused.value.dependents) == {"merged:af", "merged:team"}
    assert "--cascade" in str(refused.value)
    assert digest_tree(store.root / "user" / "alice") == before and store.exists("merged:team")

    deleted = store.delete("user:alice", cascade=True)
    assert deleted == ("merged:team", "merged:af", "user:alice")  # most derived first
    assert not any(store.exists(r) for r in deleted)
    assert {ref: digest_tree(store._adapter_dir(ref)) for ref in untouched} == untouched
    assert [a.adapter for a in store.list()] == ["user:bob", "domain:finance", "merged:fb"]
    assert store.verify().ok


def test_dependents_include_copies_and_layers_and_any_version(store):
    loaded = store.load("user:alice")
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1))
    merge(store, ["user:alice@v1", "domain:finance"], "merged:old", "cat")  # names alice@v1 only
    store.create("user:carol", over="domain:finance")
    store.create("user:dave", source="domain:finance")
    assert [d.adapter for d in store.dependents("user:alice")] == ["merged:old"]
    by_adapter = {d.adapter: d.describe() for d in store.dependents("domain:finance")}
    assert by_adapter == {"merged:old": "merged from domain:finance", "user:carol": "layered on domain:finance",
                          "user:dave": "started from domain:finance"}
    store.delete("merged:old")  # a leaf: no cascade needed
    assert store.dependents("user:alice") == []
    assert store.delete("user:alice") == ("user:alice",)
