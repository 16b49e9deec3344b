"""``persona import``: an existing PEFT LoRA adapter becomes v1 of a new adapter (issue 13, section 2).

The adapter is saved by PEFT's own ``save_pretrained`` on the tiny base (non-trivially initialised),
so the round trip checks persona against PEFT, not against itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from persona import LoraSettings, Store
from persona.compose.peft_import import import_adapter
from persona.errors import (AdapterSourceNotFound, IncompatibleAdapter, NonFiniteWeights, UnsafeWeightFile)

IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 7, 8], [3, 99, 1000, 4, 250, 6, 13, 21]])
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def peft_folder(tiny_base, tmp_path_factory) -> Path:
    """A LoRA saved by PEFT itself (rank 4, three target kinds, random A and B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    folder = tmp_path_factory.mktemp("peft") / "alice-lora"
    get_peft_model(model, config).save_pretrained(str(folder))
    assert {CONFIG, WEIGHTS} <= {p.name for p in folder.iterdir()}
    return folder


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    return Store.init(isolated_store, base=tiny_base)


def variant(peft_folder: Path, tmp_path: Path, *, tensors=None, config=None) -> Path:
    """A copy of the PEFT folder with its tensors and/or config changed by the given functions."""
    folder = tmp_path / "variant"
    shutil.copytree(peft_folder, folder)
    if tensors is not None:
        save_file(tensors(load_file(str(folder / WEIGHTS))), str(folder / WEIGHTS))
    if config is not None:
        document = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps(config(document)))
    return folder


def assert_nothing_written(store: Store, name: str = "user:alice") -> None:
    assert not store.exists(name)
    assert store.list() == []
    assert not (store.root / "user").exists() or list((store.root / "user").iterdir()) == []


# --------------------------------------------------------------------------------- round trip
def test_imported_peft_adapter_serves_exactly_as_peft(store, peft_folder, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona.base import load_base
    from persona.serving.engine import Engine
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    info = import_adapter(store, str(peft_folder), "user:alice")
    assert (info.version, info.lora["rank"], info.lora["target_modules"]) == (1, 4, ["down_proj", "q_proj", "v_proj"])
    files = {name: hashlib.sha256((peft_folder / name).read_bytes()).hexdigest() for name in (CONFIG, WEIGHTS)}
    assert info.imported == {"source": str(peft_folder.resolve()), "revision": None, "files": files}
    assert store.version_info("user:alice").imported == info.imported  # recorded in meta.json, read back
    assert store.load("user:alice").config["base_model_name_or_path"] == store.config.base_id

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(peft_folder)).eval()
    prompt = "The quick brown fox"
    base = load_base(tiny_base)
    with Engine(store, base=base) as engine:
        ours = engine.logits(IDS, None, ["user:alice", "user:alice"])
        text = engine.generate([GenerationRequest("user:alice", prompt=prompt,
                                                  params=SamplingParams(max_new_tokens=10))])[0].text
        plain = engine.logits(IDS, None, [engine.base_name, engine.base_name])
    with torch.no_grad():
        expected = theirs(IDS).logits
        ids = base.tokenizer(prompt, return_tensors="pt").input_ids
        out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert (ours - expected).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the output: equality above is not vacuous
    assert text and text == base.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_fp16_adapter_is_stored_as_float32(store, peft_folder, tmp_path):
    folder = variant(peft_folder, tmp_path, tensors=lambda t: {k: v.half() for k, v in t.items()})
    import_adapter(store, str(folder), "user:alice")
    loaded = store.load("user:alice").tensors
    source = load_file(str(folder / WEIGHTS))
    assert all(v.dtype == torch.float32 and torch.equal(v, source[k].float()) for k, v in loaded.items())


# ------------------------------------------------------------------------- refused, nothing written
def test_wrongly_shaped_tensor_is_refused_with_nothing_written(store, peft_folder, tmp_path):
    def widen(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_B.weight"))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        return tensors

    with pytest.raises(IncompatibleAdapter, match=r"q_proj has A \(4, 64\) and B \(65, 4\).*needs A \(4, 64\) and B \(64, 4\)"):
        import_adapter(store, str(variant(peft_folder, tmp_path, tensors=widen)), "user:alice")
    assert_nothing_written(store)


def test_rank_that_disagrees_with_the_config_is_refused(store, peft_folder, tmp_path):
    folder = variant(peft_folder, tmp_path, config=lambda c: {**c, "r": 8})
    with pytest.raises(IncompatibleAdapter, match="with r=8"):
        import_adapter(store, str(folder), "user:alice")
    assert_nothing_written(store)


def test_target_module_the_base_lacks_is_refused(store, peft_folder, tmp_path):
    folder = variant(peft_folder, tmp_path, config=lambda c: {**c, "target_modules": ["q_proj", "c_attn"]})
    with pytest.raises(IncompatibleAdapter, match="c_attn do not exist in this base"):
        import_adapter(store, str(folder), "user:alice")
    assert_nothing_written(store)


def test_tensor_of_a_module_the_base_lacks_is_refused(store, peft_folder, tmp_path):
    def move(tensors):  # the tiny base has layers 0 and 1 only
        return {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}

    with pytest.raises(IncompatibleAdapter, match=r"model\.layers\.7\.\S+ does not exist in this base"):
        import_adapter(store, str(variant(peft_folder, tmp_path, tensors=move)), "user:alice")
    assert_nothing_written(store)


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "use_dora": True}, "use_dora"),
    (lambda c: {**c, "peft_type": "LOHA"}, "LOHA adapter"),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, "no usable r"),
])
def test_not_a_plain_lora_is_refused(store, peft_folder, tmp_path, change, message):
    with pytest.raises(IncompatibleAdapter, match=message):
        import_adapter(store, str(variant(peft_folder, tmp_path, config=change)), "user:alice")
    assert_nothing_written(store)


def test_non_lora_tensor_key_is_refused(store, peft_folder, tmp_path):
    def add_head(tensors):
        return {**tensors, "base_model.model.lm_head.weight": torch.zeros(4, 64)}

    with pytest.raises(IncompatibleAdapter, match="is not a LoRA factor"):
        import_adapter(store, str(variant(peft_folder, tmp_path, tensors=add_head)), "user:alice")
    assert_nothing_written(store)


def test_nan_is_refused(store, peft_folder, tmp_path):
    def poison(tensors):
        key = sorted(tensors)[0]
        tensors[key][0, 0] = float("nan")
        return tensors

    with pytest.raises(NonFiniteWeights):
        import_adapter(store, str(variant(peft_folder, tmp_path, tensors=poison)), "user:alice")
    assert_nothing_written(store)


def test_pickle_adapter_model_bin_is_refused(store, peft_folder, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(peft_folder / CONFIG, folder / CONFIG)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle, never opened")
    with pytest.raises(UnsafeWeightFile, match="adapter_model.bin, a pickle file; persona reads safetensors only"):
        import_adapter(store, str(folder), "user:alice")
    assert_nothing_written(store)


def test_missing_folder_is_a_clear_error(store, tmp_path):
    with pytest.raises(AdapterSourceNotFound, match="no adapter folder"):
        import_adapter(store, str(tmp_path / "nope"), "user:alice")


def test_create_from_tensors_checks_shapes_against_the_base(store):
    """Regression: create(tensors=...) accepted a wrongly shaped tensor, and the adapter failed only at load."""
    from persona.peft_format import lora_key, peft_adapter_config

    config = peft_adapter_config(LoraSettings(rank=2, target_modules=("q_proj",)), ("q_proj",), store.config.base_id)
    tensors = {lora_key(f"model.layers.{i}.self_attn.q_proj", "A"): torch.randn(2, 64) for i in (0, 1)}
    tensors |= {lora_key(f"model.layers.{i}.self_attn.q_proj", "B"): torch.randn(64, 2) for i in (0, 1)}
    store.create("user:good", LoraSettings(rank=2), tensors=tensors, adapter_config=config)
    tensors[lora_key("model.layers.1.self_attn.q_proj", "B")] = torch.randn(32, 2)
    with pytest.raises(IncompatibleAdapter, match=r"q_proj has A \(2, 64\) and B \(32, 2\)"):
        store.create("user:alice", LoraSettings(rank=2), tensors=tensors, adapter_config=config)
    assert not store.exists("user:alice")


# ------------------------------------------------------------------------------------- the Hub
def hub_cache(root: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, blobs/SHA, snapshots/COMMIT/FILE -> blob}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_imports_offline_from_the_local_cache(store, peft_folder, offline_hub):
    files = {name: (peft_folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    hub_cache(offline_hub, "acme/alice-lora", files, commit="0123456789abcdef0123456789abcdef01234567")
    info = import_adapter(store, "acme/alice-lora", "user:alice")
    assert info.imported == {"source": "acme/alice-lora", "revision": "0123456789abcdef0123456789abcdef01234567",
                             "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    source = load_file(str(peft_folder / WEIGHTS))
    assert all(torch.equal(t, source[k]) for k, t in store.load("user:alice").tensors.items())


def test_missing_hub_id_offline_is_a_clear_error(store, offline_hub):
    with pytest.raises(AdapterSourceNotFound, match="HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"):
        import_adapter(store, "acme/nobody", "user:alice")
    assert_nothing_written(store)


# --------------------------------------------------------------------------------------- CLI
def test_cli_import_json_and_errors(run_cli, peft_folder, offline_hub, tmp_path):
    out = json.loads(run_cli("import", peft_folder, "--as", "user:alice", "--json").output)
    assert out["adapter"] == "user:alice" and out["imported"]["source"] == str(peft_folder.resolve())
    assert "imported" in json.loads(run_cli("show", "user:alice", "--json").output)["versions"][0]
    assert f"imported from {peft_folder.resolve()}" in run_cli("show", "user:alice").output
    again = run_cli("import", peft_folder, "--as", "user:alice", ok=False)
    assert again.exit_code == 1 and "already exists" in again.output
    missing = run_cli("import", "acme/nobody", "--as", "user:bob", "--json", ok=False)
    error = json.loads(missing.stderr)["error"]
    assert missing.exit_code == 1 and error["type"] == "AdapterSourceNotFound" and "HF_HUB_OFFLINE" in error["message"]
    help_text = run_cli("import", "--help").output
    assert "Examples:" in help_text and "adapter_model.bin" in help_text


def test_init_with_a_relative_base_path_records_it_absolute(tiny_base, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from persona.cli import main

    monkeypatch.chdir(Path(tiny_base).parent)
    relative = f"./{Path(tiny_base).name}"
    result = CliRunner().invoke(main, ["init", "--store", str(tmp_path / "s"), "--base", relative, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["base"] == str(Path(tiny_base).resolve())
    monkeypatch.chdir(tmp_path)  # another working directory: the store still finds its base
    store = Store.open(tmp_path / "s")
    assert store.config.base_id == str(Path(tiny_base).resolve())
    assert store.create("user:alice", LoraSettings(rank=2)).version == 1
