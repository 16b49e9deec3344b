"""``persona export`` (issue 13): a plain PEFT folder that PEFT loads with the same output as persona's engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from persona import InvalidReference, LoraSettings, Store
from persona.base import loader_name
from persona.compose.export import export_adapter
from persona.errors import ExportTargetExists

PROMPT = "The capital of France is"
FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(init="random", rank=4, seed=1))
    store.create("domain:finance", LoraSettings(init="random", rank=4, alpha=4, seed=2))
    store.create("user:carol", LoraSettings(init="random", rank=2, seed=4), over="domain:finance")
    return store


@pytest.fixture
def engine(store, tiny_base):
    from persona.base import load_base
    from persona.serving.engine import Engine

    with Engine(store, base=load_base(tiny_base), max_resident=8) as engine:
        yield engine


def greedy_engine(engine, model: str) -> str:
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    request = GenerationRequest(model, prompt=PROMPT, params=SamplingParams(max_new_tokens=12, temperature=0))
    return engine.generate([request])[0].text


def greedy_peft(folder: Path) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]  # what a loader is given: it must resolve on its own
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(folder)).eval()
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("ref, merge", [("user:alice", False), ("user:alice+domain:finance*0.5", True),
                                        ("user:carol", True)])
def test_export_loads_in_plain_peft_with_the_engines_greedy_output(store, engine, tmp_path, tiny_base, ref, merge):
    result = export_adapter(store, ref, tmp_path / "out", merge=merge)
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == FILES  # nothing else: no meta, no Fisher, no manifest
    assert result.merged == merge and result.base_model_name_or_path == str(Path(tiny_base).resolve())
    want = greedy_engine(engine, ref)
    assert want != greedy_engine(engine, engine.base_name)  # the adapter changes the output: equality means something
    assert greedy_peft(folder) == want


def test_model_card_names_base_fingerprint_versions_and_lineage(store, tmp_path):
    result = export_adapter(store, "user:carol", tmp_path / "carol", merge=True)
    card = (tmp_path / "carol" / "README.md").read_text()
    assert result.pinned == "user:carol@v0001+domain:finance@v0001"
    assert store.config.base_fingerprint in card and loader_name(store.config.base_id) in card
    assert "## user:carol@v0001" in card and "## domain:finance@v0001" in card and "user:carol" in card
    assert store.version_info("user:carol").files["adapter_model.safetensors"] in card
    assert "data digest" in card and "lineage" in card and "metrics" in card
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card


def test_stacks_and_layered_adapters_need_merge(store, tmp_path):
    for ref in ("user:carol", "user:alice+domain:finance", "user:alice*0.5"):
        with pytest.raises(InvalidReference, match="--merge"):
            export_adapter(store, ref, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_folder_and_writes_into_an_empty_one(store, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportTargetExists, match="not an empty folder"):
        export_adapter(store, "user:alice", occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_adapter(store, "user:alice", empty)
    assert sorted(p.name for p in empty.iterdir()) == FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp folder left behind


def test_export_refuses_a_folder_inside_the_store_which_would_corrupt_it(store, tmp_path):
    before = [a.adapter for a in store.list()]
    link = tmp_path / "link-to-store"
    link.symlink_to(store.root)
    for dest in (store.root / "user" / "alice" / "v0002", store.root / "user" / "eve" / "v0001", store.root / "out",
                 link / "user" / "bob"):
        with pytest.raises(ExportTargetExists, match="inside the adapter store"):
            export_adapter(store, "user:alice", dest)
        assert not os.path.lexists(dest)
    assert [a.adapter for a in store.list()] == before and store.verify().ok


def test_export_of_one_weighted_adapter_explains_the_weight(store, tmp_path):
    with pytest.raises(InvalidReference, match=r"one adapter at weight 0\.5.*--merge") as caught:
        export_adapter(store, "user:alice*0.5", tmp_path / "out")
    assert "1 LoRA adapters" not in str(caught.value)


def test_cli_export(run_cli, tmp_path):
    run_cli("create", "user:alice", "--init", "random")
    out = run_cli("export", "user:alice", tmp_path / "a", "--json")
    data = json.loads(out.output)
    assert data["pinned"] == "user:alice@v0001" and sorted(data["files"]) == FILES and not data["merged"]
    run_cli("create", "domain:finance", "--init", "random")
    bad = run_cli("export", "user:alice+domain:finance", tmp_path / "b", ok=False)
    assert bad.exit_code == 1 and "--merge" in bad.output and "Traceback" not in bad.output
    run_cli("export", "user:alice+domain:finance", tmp_path / "b", "--merge")
    assert sorted(os.listdir(tmp_path / "b")) == FILES
    again = run_cli("export", "user:alice", tmp_path / "a", ok=False)
    assert again.exit_code == 1 and "not an empty folder" in again.output


def test_export_of_an_ewc_version_holds_the_lora_tensors_only(store, tmp_path):
    # An EWC version keeps a Fisher with the adapter's own tensor keys beside it: a loader that reads
    # every *.safetensors of a folder (LoRAX, TGI) would load Fisher values as LoRA factors.
    from safetensors.torch import load_file

    from persona.store import NewVersion

    alice = store.load("user:alice")
    fisher = {k: torch.full_like(v, 7.0) for k, v in alice.tensors.items()}
    store.publish_version("user:alice", NewVersion(alice.tensors, alice.config, parent=1,
                                                   extra_files={"fisher": fisher}))
    export_adapter(store, "user:alice", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == FILES
    globbed = {}
    for path in sorted((tmp_path / "out").glob("*.safetensors")):  # as LoRAX loads a folder
        globbed.update(load_file(str(path)))
    assert globbed.keys() == alice.tensors.keys()
    assert all(torch.equal(globbed[k], alice.tensors[k]) for k in globbed)


def test_export_then_import_round_trips_every_tensor_bit_for_bit(store, tmp_path):
    """A layered adapter exported with --merge comes back through `persona import` as a plain adapter
    that holds exactly the merge: export and import agree on the format, nothing is lost or rescaled."""
    from safetensors.torch import load_file

    from persona.compose.peft_import import import_adapter

    for ref, merge, into in (("user:alice", False, "user:alice2"), ("user:carol", True, "user:carol2")):
        out = tmp_path / into.replace(":", "-")
        export_adapter(store, ref, out, merge=merge)
        info = import_adapter(store, str(out), into)
        assert info.version == 1 and store.version_info(into).over_ref is None  # a plain adapter now
        exported = load_file(str(out / "adapter_model.safetensors"))
        imported = store.load(into).tensors
        assert exported.keys() == imported.keys()
        assert all(torch.equal(exported[k].float(), imported[k]) for k in exported)
        config = json.loads((out / "adapter_config.json").read_text())
        back = store.load(into).peft_config
        assert (back.r, back.lora_alpha) == (config["r"], config["lora_alpha"])  # the same scaling
