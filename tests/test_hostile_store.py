"""Hostile and broken input against the store (issue 10, items 5-11): each test names what it pins.

A damaged file damages one adapter, never the store; meta.json is trusted for nothing it could use to
reach outside its version folder or to pass one adapter off as another; a user's data never reaches a
domain adapter by any lineage path; NaN never publishes; interaction files are private from their
first byte; a crash between publishing and consuming the pending queue never trains rows twice.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from persona.store import NewVersion
from persona import (
    DamagedAdapter,
    IntegrityError,
    InvalidConfig,
    InvalidInteractions,
    InvalidName,
    InvalidReference,
    LoraSettings,
    NonFiniteWeights,
    Store,
)
from persona.interactions import Interaction, data_digest

RANK = dict(rank=4, init="random")


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:bob", 2), ("domain:finance", 3)):
        store.create(ref, LoraSettings(seed=seed, **RANK))
    return store


def meta_path(store: Store, ref: str, version: int = 1) -> Path:
    return store._adapter_dir(ref) / f"v{version:04d}" / "meta.json"


def edit_meta(store: Store, ref: str, change, version: int = 1) -> None:
    path = meta_path(store, ref, version)
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


DAMAGE = {
    "missing key": lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "created"})),
    "bad json": lambda p: p.write_text(p.read_text()[:-20]),
    "wrong type": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "files": ["adapter_model.safetensors"]})),
    "version as string": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "version": "1"})),
    "not an object": lambda p: p.write_text("[1, 2]"),
    "deeply nested": lambda p: p.write_text("[" * 200_000 + "]" * 200_000),
}


# ---------------------------------------------------------------- item 5: one damaged meta.json
@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_meta_damages_only_its_adapter(store, damage):
    DAMAGE[damage](meta_path(store, "user:alice"))
    listed = {a.adapter: a for a in store.list()}
    assert set(listed) == {"user:alice", "user:bob", "domain:finance"}
    assert listed["user:alice"].is_damaged and not listed["user:bob"].is_damaged
    assert "meta.json" in str(listed["user:alice"].damaged[0])
    with pytest.raises(DamagedAdapter, match="user:alice@v0001: meta.json is damaged"):
        store.load("user:alice")
    assert store.load("user:bob").info.adapter == "user:bob"
    report = store.verify()
    assert [(p.adapter, p.path) for p in report.problems] == [("user:alice", "meta.json")]
    assert store.delete("user:bob") == ("user:bob",)
    assert store.delete("user:alice") == ("user:alice",)  # a damaged adapter is deletable
    assert [a.adapter for a in store.list()] == ["domain:finance"]


def test_damaged_refs_json_damages_only_its_adapter(store):
    (store._adapter_dir("user:alice") / "refs.json").write_text('{"aliases": {"current": "one"}}')
    alice = store.show("user:alice")
    assert alice.is_damaged and "refs.json" in str(alice.damaged[0]) and len(alice.versions) == 1
    with pytest.raises(DamagedAdapter, match="refs.json is damaged"):
        store.load("user:alice")
    assert store.load("user:alice@v1").info.version == 1  # a pinned version needs no alias
    assert not store.verify("user:bob").problems


def test_old_meta_without_newer_fields_still_loads(store):
    edit_meta(store, "user:bob", lambda m: [m.pop(k) for k in ("over", "pending", "lineage", "training", "format")])
    assert store.load("user:bob").info.pending is None and store.verify().ok


def test_cli_list_and_verify_report_a_damaged_adapter_and_delete_it(run_cli, isolated_store):
    run_cli("create", "user:alice")
    run_cli("create", "user:bob")
    path = isolated_store / "user" / "alice" / "v0001" / "meta.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "files"}))
    out = run_cli("list").output
    assert "user:bob" in out and "user:alice" in out and "DAMAGED" in out and "missing key 'files'" in out
    rows = {r["adapter"]: r for r in json.loads(run_cli("list", "--json").output)}
    assert rows["user:alice"]["damaged"] and rows["user:bob"]["damaged"] == []
    failed = run_cli("verify", ok=False)
    assert failed.exit_code == 1 and "user:alice@v0001: meta.json: damaged meta.json" in failed.output
    assert "DAMAGED" in run_cli("show", "user:alice").output
    run_cli("delete", "user:bob", "--yes")
    run_cli("delete", "user:alice", "--yes")
    assert json.loads(run_cli("list", "--json").output) == []


def test_models_route_keeps_working_with_a_damaged_adapter(store):
    from fastapi.testclient import TestClient

    from persona.http.app import ServerConfig, create_app

    class StoreOnlyEngine:  # /v1/models reads only the store; no base model is needed
        base_name = "tiny"

        def __init__(self, store):
            self.store = store

    DAMAGE["missing key"](meta_path(store, "user:alice"))
    with TestClient(create_app(StoreOnlyEngine(store), ServerConfig(auth=False))) as client:
        response = client.get("/v1/models")
    assert response.status_code == 200
    assert {"user:bob", "domain:finance"} <= {m["id"] for m in response.json()["data"]}


# ---------------------------------------------------------------- item 6: file names in meta.json
def test_meta_file_name_outside_the_version_folder_is_damage(store):
    outside = store.root / "persona.json"
    digest = __import__("hashlib").sha256(outside.read_bytes()).hexdigest()
    edit_meta(store, "user:alice", lambda m: m["files"].update({"../../../persona.json": digest}))
    with pytest.raises(DamagedAdapter, match=r"'\.\./\.\./\.\./persona\.json'"):
        store.load("user:alice")
    assert store.show("user:alice").is_damaged
    assert [p.path for p in store.verify().problems] == ["meta.json"]


def test_meta_file_name_is_checked_by_containment_at_load(store):
    # A plain name that is a symlink out of the folder: the name passes the pattern, containment does not.
    folder = store._adapter_dir("user:alice") / "v0001"
    target = store.root.parent / "elsewhere.safetensors"
    shutil.copy(folder / "adapter_model.safetensors", target)
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(target, folder / "adapter_model.safetensors")  # same bytes: the sha256 still matches
    with pytest.raises(DamagedAdapter, match="not a file of the version folder"):
        store.load("user:alice")
    assert any("symlink" in p.reason for p in store.verify().problems)


# ---------------------------------------------------------------- item 7: a version is where it claims
def test_version_copied_from_another_user_is_refused(store):
    alice = store._adapter_dir("user:alice")
    shutil.copytree(store._adapter_dir("user:bob") / "v0001", alice / "v0002")
    (alice / "refs.json").write_text(json.dumps({"aliases": {"current": 2}}))
    with pytest.raises(DamagedAdapter, match="claims to be user:bob@v0001"):
        store.load("user:alice")
    problems = store.verify().problems
    assert [(p.adapter, p.version) for p in problems] == [("user:alice", 2)] and "claims to be user:bob" in problems[0].reason


def test_version_renumbered_inside_its_adapter_is_refused(store):
    alice = store._adapter_dir("user:alice")
    shutil.copytree(alice / "v0001", alice / "v0007")
    with pytest.raises(DamagedAdapter, match="claims to be user:alice@v0001"):
        store.load("user:alice@v7")


def test_symlinked_version_folder_is_refused(store, tmp_path):
    outside = tmp_path / "outside-v2"
    shutil.copytree(store._adapter_dir("user:alice") / "v0001", outside)
    edit = json.loads((outside / "meta.json").read_text())
    (outside / "meta.json").write_text(json.dumps({**edit, "version": 2, "parent": 1}))
    os.symlink(outside, store._adapter_dir("user:alice") / "v0002")
    with pytest.raises(DamagedAdapter, match="symlink"):
        store.load("user:alice@v2")
    assert "user/alice/v0002" in [p.path for p in store.verify().problems]


def test_symlinked_adapter_folder_inside_the_root_is_refused(store):
    os.symlink(store._adapter_dir("user:bob"), store.root / "user" / "mallory")
    with pytest.raises(InvalidName, match="symlink"):
        store.load("user:mallory")
    listed = {a.adapter: a for a in store.list()}
    assert listed["user:mallory"].versions == () and "symlink" in listed["user:mallory"].damaged[0].reason
    assert [(p.adapter, p.path) for p in store.verify().problems] == [("user:mallory", "user/mallory")]


def test_symlinked_adapter_folder_is_listed_as_damaged_and_delete_removes_only_the_link(store):
    before = [v.to_dict() for v in store.versions("user:alice")]
    os.symlink("../user/alice", store.root / "user" / "zed")
    (zed,) = [a for a in store.list() if a.adapter == "user:zed"]
    assert zed.is_damaged and zed.damaged[0].reason.startswith("symlink")
    assert store.delete("user:zed") == ("user:zed",)
    assert not os.path.lexists(store.root / "user" / "zed")
    assert [v.to_dict() for v in store.versions("user:alice")] == before
    store.load("user:alice")  # the target is intact and loads


# ---------------------------------------------------------------- item 8: no user data in a domain
@pytest.fixture
def merged_from_bob(store):
    from persona import merge

    merge(store, ["user:bob", "domain:finance"], "merged:m", "cat")
    return store


def test_domain_from_a_merge_of_a_user_is_refused_with_the_path(merged_from_bob):
    store = merged_from_bob
    with pytest.raises(InvalidReference, match=r"domain:leak <- merged:m@v1 \(from\) <- user:bob@v1 \(merge\)"):
        store.create("domain:leak", source="merged:m")
    assert not store.exists("domain:leak")


def test_domain_lineage_is_followed_through_every_hop(merged_from_bob):
    from persona import merge

    store = merged_from_bob
    merge(store, ["merged:m", "domain:finance"], "merged:m2", "cat")  # merged adapters may hold users' data
    with pytest.raises(InvalidReference, match=r"merged:m2@v1 \(from\) <- merged:m@v1 \(merge\) <- user:bob@v1"):
        store.create("domain:leak", source="merged:m2")
    loaded = store.load("merged:m")
    with pytest.raises(InvalidReference, match="user:bob"):  # the library path: a new version with that lineage
        store.publish_version("domain:finance", NewVersion(
            loaded.tensors, loaded.config, parent=1, lineage=({"adapter": "merged:m", "version": 1, "relation": "from"},)))
    with pytest.raises(InvalidReference, match="user:bob"):  # and create from tensors with that lineage
        store.create("domain:leak2", tensors=loaded.tensors, adapter_config=loaded.config,
                     lineage=({"adapter": "user:bob", "version": 1, "relation": "merge"},))
    assert store.version_numbers("domain:finance") == [1] and not store.exists("domain:leak2")


def test_merge_into_a_domain_is_refused(store):
    from persona import merge

    with pytest.raises(InvalidReference, match="merged adapter"):
        merge(store, ["user:bob", "domain:finance"], "domain:leak", "cat")
    assert not store.exists("domain:leak")


def test_domain_from_a_user_free_merge_is_allowed(store):
    from persona import merge

    store.create("domain:legal", LoraSettings(seed=4, **RANK))
    merge(store, ["domain:legal", "domain:finance"], "merged:shared", "cat")
    assert store.create("domain:both", source="merged:shared").lineage[0]["adapter"] == "merged:shared"


def test_verify_reports_a_domain_that_already_descends_from_a_user(merged_from_bob):
    store = merged_from_bob  # as a store written before the check would hold it
    edit_meta(store, "domain:finance", lambda m: m.update(lineage=[{"adapter": "merged:m", "version": 1, "relation": "from"}]))
    problems = [p for p in store.verify().problems if p.adapter == "domain:finance"]
    assert problems and "descends from a user adapter" in problems[0].reason and "user:bob" in problems[0].reason
    loaded = store.load("domain:finance")  # and its next version (an update) is refused: the parent path
    with pytest.raises(InvalidReference, match=r"domain:finance@v1 \(parent\) <- merged:m@v1 \(from\) <- user:bob"):
        store.publish_version("domain:finance", NewVersion(loaded.tensors, loaded.config, parent=1))


# ---------------------------------------------------------------- item 9: no NaN publishes
def nan_copy(tensors):
    out = {k: v.clone() for k, v in tensors.items()}
    first = sorted(out)[0]
    out[first][0, 0] = float("nan")
    return out


def test_non_finite_tensors_are_refused_on_create_and_publish(store):
    loaded = store.load("user:bob")
    with pytest.raises(NonFiniteWeights, match="NaN or infinity"):
        store.create("domain:nan", tensors=nan_copy(loaded.tensors), adapter_config=loaded.config)
    assert not store.exists("domain:nan") and not (store.root / "domain" / "nan").exists()
    inf = {k: v.clone().fill_(float("inf")) for k, v in loaded.tensors.items()}
    with pytest.raises(NonFiniteWeights):
        store.publish_version("user:bob", NewVersion(inf, loaded.config, parent=1))
    with pytest.raises(NonFiniteWeights):  # extras (an EWC Fisher) too
        store.publish_version("user:bob", NewVersion(
            loaded.tensors, loaded.config, parent=1, extra_files={"fisher": nan_copy(loaded.tensors)}))
    assert store.version_numbers("user:bob") == [1] and store.verify().ok


@pytest.mark.parametrize("weights", [[1e308, 1e308], [101.0, 1.0], [-1000.0, 1.0]])
def test_merge_weights_beyond_the_bound_are_refused(store, weights):
    from persona import merge

    with pytest.raises(InvalidConfig, match=r"weights must lie in \[-100, 100\]"):
        merge(store, ["user:bob", "domain:finance"], "merged:nan", "linear", weights=weights)
    assert not store.exists("merged:nan")


@pytest.mark.parametrize("method, arithmetic", [("cat", "cat_adapters"), ("svd", "_peft_merge")])
def test_merge_producing_nan_publishes_nothing(store, monkeypatch, method, arithmetic):
    import persona.compose.merge as compose
    from persona import merge

    real = getattr(compose, arithmetic)
    monkeypatch.setattr(compose, arithmetic, lambda *a: (lambda t, c: (nan_copy(t), c))(*real(*a)))
    with pytest.raises(NonFiniteWeights):
        merge(store, ["user:bob", "domain:finance"], "merged:nan", method)
    assert not store.exists("merged:nan")


def test_update_producing_nan_publishes_nothing(store, monkeypatch):
    from persona.training.trainer import Trainer, UpdateConfig

    def nan_optimize(self, weights, *args, **kwargs):
        for a, b in weights.factors.values():
            with torch.no_grad():
                a.fill_(float("nan"))
        return [float("nan")], 1

    monkeypatch.setattr(Trainer, "_optimize", nan_optimize)
    rows = [Interaction(prompt=f"q{i}", completion=f"a{i}") for i in range(6)]
    with pytest.raises(NonFiniteWeights, match="lower the learning rate"):
        Trainer(store).update("user:alice", rows, UpdateConfig(epochs=1, max_length=96, force=True))
    assert store.version_numbers("user:alice") == [1]


# ---------------------------------------------------------------- item 10: private from the first byte
@pytest.fixture
def replaced_modes(monkeypatch):
    """The mode of every temp file at the instant it is renamed into place, by final name."""
    import persona._fs as fsutil

    modes: dict[str, list[int]] = {}
    real = os.replace

    def spying_replace(src, dst):
        if os.path.isfile(src):
            modes.setdefault(Path(dst).name, []).append(stat.S_IMODE(os.lstat(src).st_mode))
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", spying_replace)
    return modes


def test_private_files_are_0600_from_the_start(store, replaced_modes):
    from persona.store.tokens import TokenStore
    from persona.store.queues import ReplayBuffer
    from persona.training.trainer import log_interactions

    old = os.umask(0o022)
    try:
        TokenStore(store).create("user:alice")
        folder = store._adapter_dir("user:alice")
        ReplayBuffer((Interaction(text="hi"),), 1).write(folder)
        log_interactions(store, "user:alice", [Interaction(text="hello")])
    finally:
        os.umask(old)
    for name in ("tokens.json", "replay.jsonl", "replay.state.json"):
        assert replaced_modes[name] and set(replaced_modes[name]) == {0o600}, name
    for path in (store.root / "tokens.json", folder / "replay.jsonl", folder / "pending.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_pending_rewrite_keeps_0600(store, replaced_modes):
    from persona.store import queues as pending

    pending.append(store._adapter_dir("user:alice"), [Interaction(text="a"), Interaction(text="b")])
    batch = pending.read(store._adapter_dir("user:alice"))
    pending.consume(store, store.resolve("user:alice").unpinned(), batch, 1)
    assert set(replaced_modes["pending.jsonl"]) == {0o600} and set(replaced_modes["pending.state.json"]) == {0o600}


def test_log_refuses_to_write_through_a_planted_pending_symlink(store, tmp_path):
    from persona.training.trainer import log_interactions

    target = tmp_path / "victim.txt"
    target.write_text("untouched\n")
    os.symlink(target, store._adapter_dir("user:alice") / "pending.jsonl")
    with pytest.raises(IntegrityError, match="symlink; refusing to write through it"):
        log_interactions(store, "user:alice", [Interaction(text="hello")])
    assert target.read_text() == "untouched\n"
    assert store.show("user:alice").is_damaged  # and listed, not followed


def test_cli_log_through_a_pending_symlink_is_one_line_error(run_cli, isolated_store, tmp_path):
    run_cli("create", "user:alice")
    target = tmp_path / "victim.txt"
    target.write_text("")
    os.symlink(target, isolated_store / "user" / "alice" / "pending.jsonl")
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "hi"}\n')
    result = run_cli("log", "user:alice", "--data", data, ok=False)
    assert result.exit_code == 1 and "refusing to write through it" in result.output
    assert "Traceback" not in result.output and target.read_text() == ""


# ---------------------------------------------------------------- item 11: consumed exactly once
FAST = dict(epochs=1, batch_size=4, max_length=96, holdout_fraction=0.25, force=True)


def rows(tag: str, n: int) -> list[Interaction]:
    return [Interaction(prompt=f"{tag} question {i}?", completion=f"{tag} answer {i}.") for i in range(n)]


@pytest.fixture
def trained(store, monkeypatch):
    """A Trainer whose every update records the interactions it trained on."""
    from persona.training.trainer import Trainer

    trainer = Trainer(store)
    seen: list[list[Interaction]] = []
    real = trainer._train_and_publish

    def spy(ref, interactions, *args, **kwargs):
        seen.append(list(interactions))
        return real(ref, interactions, *args, **kwargs)

    monkeypatch.setattr(trainer, "_train_and_publish", spy)
    return trainer, seen


def test_crash_after_publish_before_consume_does_not_retrain_rows(store, trained, monkeypatch):
    from persona.store import queues as pending
    from persona.training.trainer import UpdateConfig, log_interactions

    trainer, seen = trained
    first, second = rows("first", 4), rows("second", 3)
    log_interactions(store, "user:alice", first)
    real_consume = pending.consume

    def killed(*args, **kwargs):  # SIGKILL right after the version was published
        raise KeyboardInterrupt

    monkeypatch.setattr(pending, "consume", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.update("user:alice", None, UpdateConfig(**FAST))
    v2 = store.version_info("user:alice@v2")
    assert v2.pending["rows"] == 4 and v2.data_digest == data_digest(first)
    assert store.show("user:alice").pending == 4  # the crash left the trained rows queued
    monkeypatch.setattr(pending, "consume", real_consume)

    log_interactions(store, "user:alice", second)
    result = trainer.update("user:alice", None, UpdateConfig(**FAST))
    assert [i.to_json() for i in seen[-1]] == [i.to_json() for i in second]  # only the new rows
    assert result.version.version == 3 and store.version_info("user:alice@v3").data_digest == data_digest(second)
    assert store.show("user:alice").pending == 0
    with pytest.raises(InvalidInteractions, match="no pending interactions"):
        trainer.update("user:alice", None, UpdateConfig(**FAST))
    assert len(seen) == 2


def test_crash_remnant_alone_leaves_nothing_pending_for_update_all(store, trained, monkeypatch):
    from persona.store import queues as pending
    from persona.training.trainer import UpdateConfig, log_interactions

    trainer, seen = trained
    log_interactions(store, "user:alice", rows("only", 4))
    real_consume = pending.consume
    monkeypatch.setattr(pending, "consume", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        trainer.update("user:alice", None, UpdateConfig(**FAST))
    monkeypatch.setattr(pending, "consume", real_consume)
    assert trainer.update_all(UpdateConfig(**FAST)) == [] and len(seen) == 1
    assert store.show("user:alice").pending == 0


def test_the_same_rows_logged_again_after_a_clean_update_are_trained(store, trained):
    from persona.training.trainer import UpdateConfig, log_interactions

    trainer, seen = trained
    same = rows("repeat", 4)
    log_interactions(store, "user:alice", same)
    trainer.update("user:alice", None, UpdateConfig(**FAST))
    log_interactions(store, "user:alice", same)  # identical lines: a new request, not a crash remnant
    trainer.update("user:alice", None, UpdateConfig(**FAST))
    assert len(seen) == 2 and [i.to_json() for i in seen[1]] == [i.to_json() for i in same]
    assert store.show("user:alice").pending == 0


def test_replay_buffer_is_never_read_through_a_symlink(store, tmp_path):
    from persona.store.queues import REPLAY, ReplayBuffer

    elsewhere = tmp_path / "someone-elses.jsonl"
    elsewhere.write_text(json.dumps({"text": "another user's secret"}) + "\n")
    folder = store._adapter_dir("user:alice")
    (folder / REPLAY).symlink_to(elsewhere)
    with pytest.raises(IntegrityError, match="symlink"):
        ReplayBuffer.read(folder)


def test_replay_row_holding_a_line_separator_survives_the_round_trip(store):
    from persona.store.queues import ReplayBuffer

    folder = store._adapter_dir("user:alice")
    row = Interaction.from_json({"prompt": "Where do I live?", "completion": "Lisbon\u2028(since May)"})
    ReplayBuffer((row,), 1).write(folder)
    assert [i.to_json() for i in ReplayBuffer.read(folder).items] == [row.to_json()]


def test_user_from_a_merge_of_another_user_is_refused_with_the_path(merged_from_bob):
    """Regression (cold trial): `merge user:bob … --into merged:m` then `create user:eve --from merged:m`
    handed bob's data to eve's token; --over the same merge did too."""
    store = merged_from_bob
    with pytest.raises(InvalidReference, match=r"user:eve <- merged:m@v1 \(from\) <- user:bob@v1 \(merge\)"):
        store.create("user:eve", source="merged:m")
    with pytest.raises(InvalidReference, match=r"user:eve <- merged:m@v1 \(over\) <- user:bob@v1"):
        store.create("user:eve", over="merged:m")
    assert not store.exists("user:eve")


def test_user_from_a_merge_of_its_own_adapter_is_allowed(merged_from_bob):
    store = merged_from_bob  # merged:m = user:bob + domain:finance
    loaded = store.load("merged:m")
    info = store.publish_version("user:bob", NewVersion(
            loaded.tensors, loaded.config, parent=1, lineage=({"adapter": "merged:m", "version": 1, "relation": "from"},)))
    assert info.version == 2
    assert store.create("user:eve", source="domain:finance").version == 1  # shared data: fine
