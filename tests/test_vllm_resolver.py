"""The vLLM LoRA resolver plugin (issue 13), against vLLM's real classes.

vLLM installs on this CPU machine with ``pip install --no-deps vllm`` (its declared dependencies pull a
CUDA torch) plus the ``vllm`` extra (msgspec); ``make test`` does both. Without vLLM these tests skip.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm.lora.resolver", reason="vLLM is not installed: `pip install --no-deps vllm` and "
                                                  "`pip install -e '.[vllm]'` (make test does both)")

from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry  # noqa: E402

from persona import LoraSettings, Store  # noqa: E402
from persona.base import loader_name  # noqa: E402
from persona.compose.materialize import materialize  # noqa: E402
from persona.integrations.vllm import RESOLVER_NAME, PersonaLoRAResolver, register, stable_id  # noqa: E402
from persona.lora_runtime import Activation, AdapterWeights, LoraRuntime  # noqa: E402
from persona.store import NewVersion  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 8]])


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(init="random", rank=4, seed=1))
    store.create("domain:finance", LoraSettings(init="random", rank=4, alpha=4, seed=2))
    store.create("user:carol", LoraSettings(init="random", rank=2, seed=4), over="domain:finance")
    return store


@pytest.fixture
def resolver(store) -> PersonaLoRAResolver:
    return PersonaLoRAResolver()  # $PERSONA_HOME (the test's store), base name from the store


def resolve(resolver, name, base=None):
    return asyncio.run(resolver.resolve_lora(base or resolver.base_names[0], name))


def test_resolver_pins_references_to_version_folders(store, resolver, tiny_base):
    # the store's base id (what the gateway sends for the base) and the loader's name (vLLM's default)
    assert resolver.base_names == tuple(dict.fromkeys((store.config.base_id, loader_name(tiny_base))))
    assert loader_name(tiny_base) == str(Path(tiny_base).resolve())
    found = resolve(resolver, "user:alice")
    assert isinstance(found, LoRARequest)
    assert found.lora_name == "user:alice@v0001"
    assert Path(found.lora_path) == store.version_folder("user:alice@v1")
    assert found.lora_int_id == stable_id("user:alice@v0001") > 0 and found.lora_int_id < 2**63
    for same in ("user:alice@v1", "user:alice@current", "user:alice@v0001"):
        again = resolve(resolver, same)
        assert (again.lora_name, again.lora_int_id, again.lora_path) == (found.lora_name, found.lora_int_id,
                                                                         found.lora_path)


def test_moved_current_resolves_to_a_new_name_and_id(store, resolver):
    first = resolve(resolver, "user:alice")
    alice = store.load("user:alice")
    store.publish_version("user:alice", NewVersion({k: v * 2 for k, v in alice.tensors.items()}, alice.config, parent=1))
    moved = resolve(resolver, "user:alice")
    assert moved.lora_name == "user:alice@v0002" and moved.lora_int_id != first.lora_int_id
    assert moved.lora_path != first.lora_path
    assert resolve(resolver, "user:alice@v1").lora_int_id == first.lora_int_id  # an old pin keeps its id


def test_ids_are_stable_across_processes(store, resolver, isolated_store):
    here = resolve(resolver, "user:alice")
    stack = resolve(resolver, "user:alice+domain:finance*0.5")
    code = ("import asyncio, json; from persona.integrations.vllm import PersonaLoRAResolver as R; r = R(); "
            "out = [asyncio.run(r.resolve_lora(r.base_names[0], m)) for m in ('user:alice', 'user:alice+domain:finance*0.5')];"
            "print(json.dumps([[x.lora_name, x.lora_int_id, x.lora_path] for x in out]))")
    env = {**os.environ, "PERSONA_HOME": str(isolated_store), "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == [[here.lora_name, here.lora_int_id, here.lora_path], [stack.lora_name, stack.lora_int_id,
                                                                           stack.lora_path]]


def test_stack_and_layered_adapter_resolve_to_the_materialized_merge_equal_to_the_stack(store, resolver, tiny_base):
    from transformers import AutoModelForCausalLM

    stack = resolve(resolver, "user:alice+domain:finance*0.5")
    assert stack.lora_name == "user:alice@v0001+domain:finance@v0001*0.5"
    merged = materialize(store, "user:alice+domain:finance*0.5")
    assert Path(stack.lora_path) == merged.path and stack.lora_int_id == stable_id(f"merge:{merged.key}")
    layered = resolve(resolver, "user:carol")
    assert layered.lora_name == "user:carol@v0001+domain:finance@v0001"

    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    runtime = LoraRuntime.attach(model)

    def logits(activations):
        with torch.no_grad(), runtime.activate(activations):
            return model(IDS).logits

    def weights(ref):
        loaded = store.load(ref)
        return AdapterWeights.from_peft(loaded.tensors, loaded.config)

    folder = Path(stack.lora_path)
    served = AdapterWeights.from_peft(load_file(str(folder / "adapter_model.safetensors")),
                                      json.loads((folder / "adapter_config.json").read_text()))
    want = logits([Activation(weights("user:alice")), Activation(weights("domain:finance"), weight=0.5)])
    got = logits([Activation(served)])
    assert (want - logits([])).abs().max() > 0.05 and (got - want).abs().max() < 1e-5


def test_tampered_version_resolves_to_none_with_a_logged_reason(store, resolver, caplog):
    weights = store.version_folder("user:alice") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="persona.vllm"):
        assert resolve(resolver, "user:alice") is None
        assert resolve(resolver, "user:alice+domain:finance") is None  # never merged from tampered weights
    assert "sha256" in caplog.text and "user:alice" in caplog.text


def test_version_folder_with_a_stray_file_resolves_to_none(store, resolver, caplog):
    # vLLM would read the folder itself: a pickle or unrecorded file beside the adapter is never handed over
    (store.version_folder("user:alice") / "adapter_model.bin").write_bytes(b"not what was published")
    with caplog.at_level(logging.WARNING, logger="persona.vllm"):
        assert resolve(resolver, "user:alice") is None
    assert "adapter_model.bin" in caplog.text


def test_foreign_base_resolves_to_none(store, resolver, caplog):
    with caplog.at_level(logging.WARNING, logger="persona.vllm"):
        assert resolve(resolver, "user:alice", base="meta-llama/Llama-3.1-8B") is None
    assert "meta-llama/Llama-3.1-8B" in caplog.text and "PERSONA_VLLM_BASE_NAME" in caplog.text
    # a version bound to another base fingerprint (copied in from another store)
    meta_path = store.version_folder("domain:finance") / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "sha256:" + "0" * 64
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="persona.vllm"):
        assert resolve(resolver, "domain:finance") is None
        assert resolve(resolver, "user:alice+domain:finance") is None
    assert "another base" in caplog.text


def test_configured_base_name_replaces_the_default(store, monkeypatch):
    monkeypatch.setenv("PERSONA_VLLM_BASE_NAME", "tiny")
    resolver = PersonaLoRAResolver()
    assert resolve(resolver, "user:alice", base="tiny").lora_name == "user:alice@v0001"
    assert resolve(resolver, "user:alice", base=loader_name(store.config.base_id)) is None


@pytest.mark.parametrize("name", ["user:ghost", "user:alice@v9", "user:alice@candidate", "user:Alice!", "domain:auto",
                                  "user:alice+domain:auto", "", "../../etc/passwd"])
def test_unknown_or_bad_references_resolve_to_none(store, resolver, caplog, name):
    with caplog.at_level(logging.WARNING, logger="persona.vllm"):
        assert resolve(resolver, name) is None
    assert "not resolving" in caplog.text


def test_an_unexpected_error_resolves_to_none_with_its_traceback_logged(store, resolver, caplog, monkeypatch):
    # vLLM awaits resolvers without a try: an exception would fail the request instead of a 404
    def broken(store, reference):
        raise RuntimeError("CUDA out of memory while merging")

    monkeypatch.setattr("persona.integrations.vllm.resolve_adapter", broken)
    with caplog.at_level(logging.WARNING, logger="persona.vllm"):
        assert resolve(resolver, "user:carol") is None
    assert "CUDA out of memory" in caplog.text and "user:carol" in caplog.text


def test_entry_point_is_declared_and_register_adds_a_lora_resolver():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"persona": "persona.integrations.vllm:register"}
    assert "msgspec" in " ".join(project["optional-dependencies"]["vllm"])
    before = dict(LoRAResolverRegistry.resolvers)
    try:
        register()
        found = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        assert isinstance(found, LoRAResolver) and isinstance(found, PersonaLoRAResolver)
    finally:
        LoRAResolverRegistry.resolvers.clear()
        LoRAResolverRegistry.resolvers.update(before)
