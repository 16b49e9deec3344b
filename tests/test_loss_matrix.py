"""Each update keeps its held-out slice, and ``persona eval REF --matrix`` scores every version on every
kept slice (issue 14): R, gain over the base, BWT and FWT as docs/TRAINING.md defines them."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import pytest
import torch

from persona import LoraSettings, Store
from persona.errors import IntegrityError, InvalidName
from persona.interactions import read_interactions
from persona.lora_runtime import AdapterWeights
from persona.store import NewVersion
from persona.training.trainer import Trainer, UpdateConfig, split_holdout

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
MAX_LENGTH = 96


def alice():
    return read_interactions(EXAMPLES / "alice.jsonl")


def version_folder(store: Store, ref: str) -> Path:
    pinned = store.resolve(ref)
    return store._version_dir(pinned, pinned.version)


def planted_store(root: Path, base: str) -> tuple[Store, dict[str, list]]:
    """user:alice: v1 fresh (B = 0: the base's outputs), v2..v4 hand-made weights each keeping a slice (v4 branches
    from v2, as an update after a rejected candidate does), v5 all-zero weights (the base again) keeping none."""
    store = Store.init(root, base=base)
    store.create("user:alice", LoraSettings(rank=2, alpha=4))
    loaded = store.load("user:alice")
    items = alice()
    slices = {"v0002": items[0:3], "v0003": items[3:6], "v0004": items[6:9]}
    torch.manual_seed(3)
    for label, parent in (("v0002", 1), ("v0003", 2), ("v0004", 2)):
        tensors = {k: torch.randn_like(v) * 0.3 for k, v in loaded.tensors.items()}
        store.publish_version("user:alice", NewVersion(tensors, loaded.config, parent=parent, heldout=slices[label]))
    zeros = {k: torch.zeros_like(v) for k, v in loaded.tensors.items()}
    store.publish_version("user:alice", NewVersion(zeros, loaded.config, parent=4))  # an old-style version: no slice
    return store, slices


def direct_loss(trainer: Trainer, store: Store, row: str, interactions) -> float:
    """R[row][slice] by the evaluate code the gate uses, one version and one slice at a time."""
    weights = None
    if row != "base":
        loaded = store.load(f"user:alice@{row}")
        weights = AdapterWeights.from_peft(loaded.tensors, loaded.config)
    return trainer.loss(trainer.tokenize(interactions, MAX_LENGTH).examples, weights)[0]


def test_matrix_of_planted_versions_matches_direct_evaluation_and_the_bwt_fwt_gain_definitions(tiny_base, isolated_store):
    store, slices = planted_store(isolated_store, tiny_base)
    trainer = Trainer(store)
    m = trainer.loss_matrix("user:alice", max_length=MAX_LENGTH)

    assert m.final == "v0005" and m.rows == ("base", "v0001", "v0002", "v0003", "v0004", "v0005")
    assert m.columns == ("v0002", "v0003", "v0004") and m.not_kept == ("v0001", "v0005")
    assert m.examples == (3, 3, 3) and all(t > 0 for t in m.tokens)
    R = {row: {col: direct_loss(trainer, store, row, slices[col]) for col in m.columns} for row in m.rows}
    for row in m.rows:
        for col in m.columns:
            assert m.loss(row, col) == pytest.approx(R[row][col], rel=1e-4), (row, col)
    # planted structure: v1 (B = 0) and v5 (all zeros) are the base exactly; the hand-made versions are not
    for col in m.columns:
        assert m.loss("v0001", col) == pytest.approx(m.loss("base", col), abs=1e-5)
        assert m.loss("v0005", col) == pytest.approx(m.loss("base", col), abs=1e-5)
        assert abs(m.loss(col, col) - m.loss("base", col)) > 1e-4  # far outside the 1e-5 of "is the base"
    gain = [R["base"][c] - R[c][c] for c in m.columns]
    assert m.gain == pytest.approx(gain, rel=1e-4, abs=1e-4)
    # BWT: every column is older than v5, which scores as the base: BWT = -mean(gain)
    assert m.bwt == pytest.approx(sum(R[c][c] - R["v0005"][c] for c in m.columns) / 3, rel=1e-4, abs=1e-4)
    assert m.bwt == pytest.approx(-sum(gain) / 3, rel=1e-4, abs=1e-4)
    # FWT: columns after the first, against their parent (v3 and v4 both started from v2)
    assert m.fwt == pytest.approx(((R["base"]["v0003"] - R["v0002"]["v0003"])
                                   + (R["base"]["v0004"] - R["v0002"]["v0004"])) / 2, rel=1e-4, abs=1e-4)

    at_v3 = trainer.loss_matrix("user:alice@v3", max_length=MAX_LENGTH)  # as of an earlier version
    assert at_v3.rows == ("base", "v0001", "v0002", "v0003") and at_v3.columns == ("v0002", "v0003")
    assert at_v3.bwt == pytest.approx(R["v0002"]["v0002"] - R["v0003"]["v0002"], rel=1e-4, abs=1e-4)
    assert at_v3.fwt == pytest.approx(R["base"]["v0003"] - R["v0002"]["v0003"], rel=1e-4, abs=1e-4)


def test_an_update_keeps_its_held_out_slice_private_and_hashed_and_verify_finds_tampering(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(rank=2, seed=1))
    trainer = Trainer(store)
    data = alice()[:12]
    config = UpdateConfig(epochs=1, batch_size=8, max_length=MAX_LENGTH, force=True)
    result = trainer.update("user:alice", data, config)

    held = split_holdout(data, config.holdout_fraction, config.seed)[1]
    assert held and store.heldout("user:alice@v2") == held
    assert store.heldout("user:alice@v1") is None and store.version_info("user:alice@v2").heldout_kept
    side = version_folder(store, "user:alice@v2") / "heldout.train"
    assert stat.S_IMODE(side.stat().st_mode) == 0o600  # a person's interactions, as the replay buffer
    assert store.verify().ok
    # the matrix's diagonal is what the gate measured on those rows
    m = trainer.loss_matrix("user:alice", max_length=MAX_LENGTH)
    assert m.columns == ("v0002",) and m.not_kept == ("v0001",)
    assert m.loss("v0002", "v0002") == pytest.approx(result.metrics["heldout_loss_after"], rel=1e-3)
    assert m.loss("v0001", "v0002") == pytest.approx(result.metrics["heldout_loss_before"], rel=1e-3)
    assert m.bwt is None and m.fwt is None  # one update: nothing earlier, nothing after the first

    side.write_bytes(side.read_bytes().replace(b"\"", b"'", 1))
    assert [(p.path, "sha256 mismatch" in p.reason) for p in store.verify().problems] == [("heldout.train", True)]
    with pytest.raises(IntegrityError):
        store.heldout("user:alice@v2")


def test_the_heldout_name_is_reserved_and_delete_removes_the_slices(tiny_base, isolated_store):
    store, _ = planted_store(isolated_store, tiny_base)
    loaded = store.load("user:alice")
    with pytest.raises(InvalidName):
        store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, extra_files={"heldout": {}}))
    with pytest.raises(InvalidName):
        store.load_extra("user:alice@v2", "heldout")
    assert len(list(isolated_store.rglob("heldout.train"))) == 3
    store.delete("user:alice")
    assert not list(isolated_store.rglob("heldout.train"))


def test_cli_eval_matrix_json_shape_and_text(run_cli, isolated_store, tiny_base):
    planted_store(isolated_store, tiny_base)  # same root and base: Store.init is idempotent
    out = json.loads(run_cli("eval", "user:alice", "--matrix", "--json", "--max-length", MAX_LENGTH).output)
    assert set(out) == {"adapter", "final", "rows", "columns", "losses", "tokens", "examples", "not_kept", "gain",
                        "bwt", "fwt"}
    assert out["adapter"] == "user:alice" and out["final"] == "v0005" and out["not_kept"] == ["v0001", "v0005"]
    assert len(out["losses"]) == len(out["rows"]) == 6 and all(len(r) == 3 for r in out["losses"])
    assert len(out["gain"]) == 3 and math.isfinite(out["bwt"]) and math.isfinite(out["fwt"])

    text = run_cli("eval", "user:alice@v2", "--matrix").output
    assert "user:alice as of v0002" in text and "not kept: v0001" in text and "BWT -" in text  # no earlier column
    assert "FWT -" in text
    bad = run_cli("eval", "user:alice", "--matrix", "--data", str(EXAMPLES / "alice.jsonl"), ok=False)
    assert bad.exit_code != 0 and "--matrix" in bad.output
    assert run_cli("eval", "user:alice", ok=False).exit_code != 0


def test_a_layered_version_is_scored_over_its_pinned_layer_as_eval_does(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    store.create("domain:finance", LoraSettings(rank=2, init="random", seed=2))
    store.create("user:bob", LoraSettings(rank=2, alpha=4), over="domain:finance")
    loaded = store.load("user:bob")
    torch.manual_seed(4)
    tensors = {k: torch.randn_like(v) * 0.3 for k, v in loaded.tensors.items()}
    held = alice()[:3]
    store.publish_version("user:bob", NewVersion(tensors, loaded.config, parent=1, heldout=held))
    trainer = Trainer(store)
    m = trainer.loss_matrix("user:bob", max_length=MAX_LENGTH)
    expected = {r.version: r.loss for r in trainer.evaluate("user:bob", held, ["base", "v1", "v2"], MAX_LENGTH)}
    assert m.loss("base", "v0002") == pytest.approx(expected["base"], rel=1e-4)
    assert m.loss("v0001", "v0002") == pytest.approx(expected["v0001"], rel=1e-4)  # the layer alone (B = 0 on top)
    assert m.loss("v0002", "v0002") == pytest.approx(expected["v0002"], rel=1e-4)
    assert abs(expected["v0001"] - expected["base"]) > 1e-3  # the layer is really applied
