"""--device/--dtype (issue 13, part 4): one resolver, the same options on every command that loads the
base, and the library following the model's device and dtype. CPU only: no test needs a GPU; the
choices made on a GPU are checked by monkeypatching what torch reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from persona import LoraSettings, Store
from persona.base import load_base, resolve_device
from persona.errors import DeviceUnavailable, InvalidConfig, mapping_for
from persona.interactions import read_interactions
from persona.serving.engine import Engine
from persona.training.config import UpdateConfig
from persona.training.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
LOADING_COMMANDS = ("serve", "generate", "chat", "update", "eval", "route")


@pytest.fixture
def gpu(monkeypatch):
    """What torch reports on a machine with a GPU, without touching CUDA: ``gpu(bf16=...)``."""
    def fake(bf16: bool = True, count: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")

    return fake


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def store(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:a", LoraSettings(init="random", seed=1, rank=4))
    return store


# ------------------------------------------------------------------------------------- resolution
def test_auto_is_cpu_float32_without_a_gpu(no_gpu):
    assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device(None, None) == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_auto_picks_cuda_in_bfloat16_where_torch_sees_a_gpu_that_has_it(gpu):
    gpu(bf16=True)
    assert resolve_device("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device("auto", "auto", training=True) == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)  # auto dtype follows the device


def test_auto_on_a_gpu_without_bfloat16_serves_float16_and_trains_float32(gpu):
    gpu(bf16=False)
    assert resolve_device("auto", "auto") == (torch.device("cuda"), torch.float16)
    assert resolve_device("auto", "auto", training=True) == (torch.device("cuda"), torch.float32)
    with pytest.raises(DeviceUnavailable, match="no bfloat16"):
        resolve_device("cuda", "bfloat16")


def test_cuda_without_a_gpu_is_a_clear_error_with_its_table_row(no_gpu):
    with pytest.raises(DeviceUnavailable, match="sees none: use --device cpu") as caught:
        resolve_device("cuda", "auto")
    assert isinstance(caught.value, RuntimeError) and "\n" not in str(caught.value)
    assert mapping_for(caught.value).exit_code == 1 and mapping_for(caught.value).http_status == 500


def test_a_gpu_index_past_the_last_is_refused(gpu):
    gpu(count=1)
    assert resolve_device("cuda:0", "float32") == (torch.device("cuda:0"), torch.float32)
    with pytest.raises(DeviceUnavailable, match="numbered from 0"):
        resolve_device("cuda:1", "float32")


def test_float16_on_the_cpu_is_refused_naming_bfloat16(no_gpu):
    with pytest.raises(InvalidConfig, match="use --dtype bfloat16"):
        resolve_device("cpu", "float16")
    with pytest.raises(InvalidConfig, match="float16"):
        load_base("unused-never-read", device="cpu", dtype="float16")  # refused before the base is looked up


def test_unknown_device_or_dtype_names_are_refused():
    with pytest.raises(InvalidConfig, match="device must be"):
        resolve_device("tpu", "auto")
    with pytest.raises(InvalidConfig, match="dtype must be"):
        resolve_device("cpu", "float8")
    assert resolve_device("cpu", torch.bfloat16)[1] == torch.bfloat16  # torch's own names work too


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_help_of_every_command_that_loads_the_base_shows_device_and_dtype(run_cli, command):
    out = run_cli(command, "--help").output
    assert "--device [auto|cpu|cuda]" in out and "--dtype [auto|float32|bfloat16|float16]" in out


def test_merge_loads_no_base_and_has_no_device_option(run_cli):
    assert "--device" not in run_cli("merge", "--help").output


@pytest.mark.parametrize("args", [
    ("generate", "user:a", "Hi"),
    ("update", "user:a", "--data", str(EXAMPLES / "alice.jsonl")),
    ("eval", "user:a", "--data", str(EXAMPLES / "alice.jsonl")),
    ("route", "Hi"),
])
def test_cuda_asked_for_without_a_gpu_is_one_line_and_loads_nothing(run_cli, no_gpu, monkeypatch, args):
    run_cli("create", "user:a")

    def never(*a, **k):
        raise AssertionError("the base was looked up")

    monkeypatch.setattr("persona.base.base_info", never)
    result = run_cli(*args, "--device", "cuda", ok=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "Error: --device cuda asked for a GPU" in result.output
    as_json = run_cli(*args, "--device", "cuda", "--json", ok=False)
    assert json.loads(as_json.output)["error"]["type"] == "DeviceUnavailable"


def test_an_unknown_dtype_is_a_usage_error(run_cli):
    result = run_cli("generate", "x", "Hi", "--dtype", "float8", ok=False)
    assert result.exit_code == 2 and "float8" in result.output


def test_generate_in_bfloat16_on_the_cpu_runs_end_to_end(run_cli):
    run_cli("create", "user:a", "--init", "random")
    out = json.loads(run_cli("generate", "user:a", "Hello", "--device", "cpu", "--dtype", "bfloat16",
                             "--max-new-tokens", "3", "--json").output)
    assert out["completion_tokens"] == 3 and out["resolved"] == ["user:a@v1"]


# ------------------------------------------------------------------------------------- the engine
def test_bfloat16_engine_logits_are_close_to_float32_and_slots_follow_the_model(store, no_gpu):
    with Engine(store, device="cpu", dtype="float32") as fp32, Engine(store, device="auto", dtype="bfloat16") as bf16:
        models = ["user:a", fp32.base_name]
        ref, got = fp32.logits(IDS, models=models), bf16.logits(IDS, models=models)
        assert (bf16.device, bf16.dtype) == (torch.device("cpu"), torch.bfloat16)
        assert got.dtype == torch.bfloat16 and ref.dtype == torch.float32
        assert all(t.dtype == torch.bfloat16 for t in bf16._cache.bank.a.values())
        adapter_effect = (ref[0] - fp32.logits(IDS[:1], models=[fp32.base_name])[0]).abs().max()
        error = (got.float() - ref).abs().max()
        assert error < 0.05 * ref.abs().max() and error < adapter_effect  # rounding, not another adapter


def test_a_given_base_in_another_dtype_is_refused_not_converted(store, tiny_base):
    base = load_base(tiny_base)
    with pytest.raises(InvalidConfig, match="loaded in float32, not bfloat16"):
        Engine(store, base=base, dtype="bfloat16")
    assert next(base.model.parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------------- training
def test_update_over_a_bfloat16_base_trains_and_stores_float32_factors(store, no_gpu):
    trainer = Trainer(store, device="cpu", dtype="bfloat16")
    assert trainer.dtype == torch.bfloat16
    config = UpdateConfig(max_steps=2, epochs=1, precision="fp32", holdout_fraction=0.25, force=True)
    result = trainer.update("user:a", read_interactions(EXAMPLES / "alice.jsonl")[:8], config)
    loaded = store.load(f"user:a@v{result.version.version}")
    assert {t.dtype for t in loaded.tensors.values()} == {torch.float32}
    assert loaded.info.training["base_dtype"] == "bfloat16" and loaded.info.training["device"] == "cpu"
    parent = store.load("user:a@v1").tensors
    assert any(not torch.equal(parent[k], loaded.tensors[k]) for k in parent)  # the factors learned
    metrics = result.metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["heldout_loss_before"], metrics["heldout_loss_after"]))


def test_training_over_a_float16_base_is_refused_before_anything_is_touched(store, tiny_base):
    base = load_base(tiny_base)
    base.model.half()  # a float16 base (e.g. an older GPU): serving is fine, training is not
    trainer = Trainer(store, base)
    with pytest.raises(InvalidConfig, match="float16 base is refused"):
        trainer.update("user:a", read_interactions(EXAMPLES / "alice.jsonl")[:4], UpdateConfig(max_steps=1))
    assert [v.version for v in store.versions("user:a")] == [1]


def test_a_given_base_with_a_placement_is_refused_by_the_trainer(store, tiny_base):
    with pytest.raises(InvalidConfig, match="a given base stays where it is"):
        Trainer(store, load_base(tiny_base), dtype="bfloat16")
