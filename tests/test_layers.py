"""The run-time LoRA wrappers compute what PEFT computes, row by row, and leave the base untouched."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from persona import InvalidConfig, LoraSettings, Store
from persona.lora_runtime import Activation, AdapterWeights, LoraRuntime


@pytest.fixture
def store(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:a", LoraSettings(init="random", seed=1, rank=4))
    store.create("user:b", LoraSettings(init="random", seed=2, rank=8, alpha=8, target_modules=("q_proj", "v_proj")))
    return store


def weights(store, ref):
    loaded = store.load(ref)
    return AdapterWeights.from_peft(loaded.tensors, loaded.config)


def peft_logits(tiny_base, folder, ids):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), str(folder)).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 300, 42, 9, 11], [7, 8, 9, 10, 11, 12], [100, 200, 300, 400, 500, 600]])


def test_no_adapter_is_bit_identical_to_the_base(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        before = model(IDS).logits
        runtime = LoraRuntime.attach(model)
        assert len(runtime.modules) == 14
        after = model(IDS).logits
    assert torch.equal(before, after)


def test_single_adapter_matches_peft(store, tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    runtime = LoraRuntime.attach(model)
    for ref in ("user:a", "user:b"):
        with torch.no_grad(), runtime.activate([Activation(weights(store, ref))]):
            ours = model(IDS).logits
        theirs = peft_logits(tiny_base, store._adapter_dir(ref) / "v0001", IDS)
        assert (ours - theirs).abs().max() < 1e-4


def test_mixed_rows_each_compute_their_own_adapter(store, tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        base = model(IDS).logits
    runtime = LoraRuntime.attach(model)
    acts = [Activation(weights(store, "user:a"), rows=torch.tensor([0])), Activation(weights(store, "user:b"), rows=torch.tensor([2]))]
    with torch.no_grad(), runtime.activate(acts):
        mixed = model(IDS).logits
    a = peft_logits(tiny_base, store._adapter_dir("user:a") / "v0001", IDS)
    b = peft_logits(tiny_base, store._adapter_dir("user:b") / "v0001", IDS)
    assert (mixed[0] - a[0]).abs().max() < 1e-4
    assert torch.equal(mixed[1], base[1])  # no adapter on row 1
    assert (mixed[2] - b[2]).abs().max() < 1e-4
    assert (a[0] - b[0]).abs().max() > 1e-2  # the adapters really differ, so a mix-up would show


def test_runtime_refuses_adapters_that_do_not_fit(store, tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    runtime = LoraRuntime.attach(model, ["q_proj"])
    with pytest.raises(InvalidConfig, match="has not wrapped"):
        runtime.set_active([Activation(weights(store, "user:a"))])
    loaded = store.load("user:b")
    with pytest.raises(InvalidConfig, match="use_dora"):
        AdapterWeights.from_peft(loaded.tensors, {**loaded.config, "use_dora": True})


def test_lora_dropout_drops_at_its_rate_and_scales_survivors():
    from persona.lora_runtime import _dropout

    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = _dropout(x, 0.1)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # the gradient flows through survivors only
    torch.manual_seed(0)
    assert torch.equal(_dropout(torch.ones(400, 500), 0.1), y.detach())  # seeded: reproducible
    assert _dropout(torch.ones(3, 5, dtype=torch.bfloat16), 0.5).dtype == torch.bfloat16
