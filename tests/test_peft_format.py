"""PEFT's on-disk format in one module (issue 12, item 2): the typed adapter_config, key naming and
parsing, and the one supported-variant check shared by the runtime and the merge."""

import json
from pathlib import Path

import pytest

from persona import InvalidConfig, LoraSettings, Store
from persona._fs import dumps_json
from persona.base import load_config
from persona.compose.merge import merge
from persona.errors import IncompatibleAdapter, UnsupportedAdapter
from persona.lora_runtime import AdapterWeights
from persona.store import NewVersion
from persona.peft_format import (
    ADAPTER_CONFIG,
    UNSUPPORTED_VARIANTS,
    PeftConfig,
    group_factors,
    lora_key,
    lora_shapes,
    parse_lora_key,
    peft_adapter_config,
    peft_tensors,
    resolve_targets,
)

FIXTURE_STORE = Path(__file__).parent / "data" / "store-v1"


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(rank=4, alpha=8))
    return store


def test_config_round_trip_equals_the_json_the_store_writes(store, tiny_base):
    written = (store._adapter_dir("user:alice") / "v0001" / ADAPTER_CONFIG).read_bytes()
    config = PeftConfig.from_json(json.loads(written))
    assert dumps_json(config.to_json()) == written  # byte for byte
    assert config == store.load("user:alice").peft_config
    assert (config.r, config.lora_alpha, config.scaling, config.peft_type) == (4, 8.0, 2.0, "LORA")
    assert config.base_model_name_or_path == tiny_base and config.variants == ()
    targets = resolve_targets(LoraSettings(), load_config(tiny_base).model_type)
    assert set(config.target_modules) == set(targets)
    # the same document is what a new adapter's settings give, and what the settings read back from
    settings = LoraSettings(rank=4, alpha=8, target_modules=targets)
    assert PeftConfig.for_settings(settings, targets, tiny_base).to_json() == json.loads(written)
    assert peft_adapter_config(settings, targets, tiny_base) == json.loads(written)
    assert LoraSettings.from_peft(config) == LoraSettings.from_peft(json.loads(written)) == \
        LoraSettings(rank=4, alpha=8, target_modules=tuple(sorted(targets)))


def test_configs_of_a_store_written_before_the_restructuring_round_trip():
    files = sorted(FIXTURE_STORE.rglob(ADAPTER_CONFIG))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert PeftConfig.from_json(data).to_json() == data


def test_config_without_rank_is_an_unsupported_adapter():
    with pytest.raises(UnsupportedAdapter, match="lora_alpha"):
        PeftConfig.from_json({"lora_alpha": 8})
    assert PeftConfig.from_json({"r": 2, "lora_alpha": 2, "target_modules": "q_proj"}).target_modules == ("q_proj",)


def test_key_build_and_parse_round_trip_for_every_target_module(store, tiny_base):
    base_config = load_config(tiny_base)
    modules = lora_shapes(base_config, resolve_targets(LoraSettings(), base_config.model_type))
    for module in modules:
        for part in ("A", "B"):
            assert parse_lora_key(lora_key(module, part)) == (module, part)
    tensors = store.load("user:alice").tensors
    assert set(tensors) == {lora_key(m, p) for m in modules for p in ("A", "B")}
    grouped = group_factors(tensors, KeyError)
    assert set(grouped) == set(modules) and all(a is not None and b is not None for a, b in grouped.values())
    assert peft_tensors(grouped) == dict(tensors)
    for other in ("model.embed_tokens.weight", "base_model.model.lora_A.weight", "base_model.model.x.lora_C.weight"):
        assert parse_lora_key(other) is None
        with pytest.raises(KeyError):
            group_factors({other: 0}, KeyError)


@pytest.mark.parametrize("variant", list(UNSUPPORTED_VARIANTS))
def test_runtime_and_merge_refuse_each_variant_with_the_same_words(store, variant):
    loaded = store.load("user:alice")
    value = {"q_proj": 2} if variant.endswith("_pattern") else True
    config = dict(loaded.config, **{variant: value})
    assert PeftConfig.from_json(config).variants == (variant,)
    words = f"uses {variant} ({UNSUPPORTED_VARIANTS[variant]}), "
    with pytest.raises(UnsupportedAdapter) as served:
        AdapterWeights.from_peft(loaded.tensors, config)
    assert str(served.value) == f"adapter {words}which persona does not support"
    with pytest.raises(IncompatibleAdapter) as created:  # create checks given weights first (issue 13)
        store.create("user:odd", tensors=loaded.tensors, adapter_config=config)
    assert f"user:odd {words}which persona cannot serve" == str(created.value) and not store.exists("user:odd")
    store.create("user:odd", tensors=loaded.tensors, adapter_config=loaded.config)
    store.publish_version("user:odd", NewVersion(loaded.tensors, config, parent=1))  # as an older persona could
    with pytest.raises(InvalidConfig) as merged:
        merge(store, ["user:alice", "user:odd"], "merged:x", "cat")
    assert words in str(merged.value) and "peft#3761" in str(merged.value)
    assert not isinstance(merged.value, UnsupportedAdapter)  # each caller keeps its error class
    assert not store.exists("merged:x")
