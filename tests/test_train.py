"""Incremental updates on the tiny base: publish, gate, replay, regularization, isolation, interrupts."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from persona import AdapterNotFound, InvalidConfig, InvalidInteractions, LoraSettings, Store
from persona.base import fingerprint
from persona.interactions import parse_interactions, read_interactions
from persona.lora_runtime import Activation, AdapterWeights
from persona.store.queues import ReplayBuffer
from persona.training.gate import GateDecision, decide
from persona.training.trainer import Trainer, UpdateConfig, log_interactions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
FAST = dict(epochs=1, batch_size=8, max_length=96)


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    for name in ("alice", "bob"):
        store.create(f"user:{name}", LoraSettings(rank=4, seed=1))
    return store


@pytest.fixture
def trainer(store) -> Trainer:
    return Trainer(store)


def alice(n=None):
    items = read_interactions(EXAMPLES / "alice.jsonl")
    return items[:n] if n else items


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_update_publishes_child_version_with_metrics(store, trainer):
    result = trainer.update("user:alice", alice(), UpdateConfig(**FAST))
    assert (result.version.version, result.parent, result.promoted) == (2, 1, True)
    assert store.resolve("user:alice").version == 2
    info = store.version_info("user:alice@v2")
    m = info.metrics
    assert m["heldout_loss_after"] < m["heldout_loss_before"]
    assert m["train_examples"] + m["heldout_examples"] == len(alice())
    assert m["gate"]["promoted"] is True and "improved" in m["gate"]["reason"]
    assert info.parent == 1 and info.data_digest and info.training["learning_rate"] == 1e-3
    assert store.verify().ok
    # what was trained is what is stored: the new tensors differ from the parent's
    t1, t2 = store.load("user:alice@v1").tensors, store.load("user:alice@v2").tensors
    assert any(not torch.equal(t1[k], t2[k]) for k in t1)


# What meta.json's "metrics" held before UpdateMetrics replaced the loose dict (issue 12): readers
# (persona show, the revision benchmark) look these keys up by name.
METRIC_KEYS = [
    "heldout_loss_before", "heldout_loss_after", "heldout_tokens", "replay_loss_before", "replay_loss_after",
    "replay_tokens", "forgetting", "train_loss_first", "train_loss_last", "steps", "train_examples",
    "heldout_examples", "replay_examples", "replay_eval_examples", "truncated", "dropped", "seconds", "gate",
    "superseded",
]


def test_update_metrics_write_the_same_meta_json_keys_with_null_for_unmeasured(store, trainer):
    result = trainer.update("user:alice", alice(), UpdateConfig(**FAST))
    recorded = store.version_info("user:alice@v2").metrics
    assert list(result.metrics) == METRIC_KEYS and dict(recorded) == dict(result.metrics)
    assert recorded["gate"] == {"promoted": True, "reason": result.reason, "forced": False}
    # no replay buffer yet: nothing measured is written as null (never NaN, which is not JSON), no forgetting
    assert recorded["replay_loss_before"] is None and recorded["replay_loss_after"] is None
    assert recorded["forgetting"] == 0.0 and recorded["replay_eval_examples"] == 0


def test_gate_decision_is_a_frozen_value_that_records_force():
    import dataclasses

    refused = decide(2.0, 2.1, 1.0, 1.0, max_forgetting=0.05, forgetting_floor=0.05)
    assert refused == GateDecision(False, "held-out loss did not improve (2.0000 -> 2.1000)", forced=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        refused.promoted = True
    forced = decide(2.0, 2.1, 1.0, 1.0, max_forgetting=0.05, forgetting_floor=0.05, force=True)
    assert forced.to_dict() == {"promoted": True, "reason": f"forced: {refused.reason}", "forced": True}
    # forcing an update the gate passes anyway still records that force was asked for, as meta.json always did
    passed = decide(2.0, 1.5, 1.0, 1.0, max_forgetting=0.05, forgetting_floor=0.05, force=True)
    assert passed.promoted and passed.forced and not passed.reason.startswith("forced")


def test_same_seed_and_data_give_the_same_weights(store, trainer):
    store.create("user:carol", LoraSettings(rank=4, seed=1))
    trainer.update("user:alice", alice(20), UpdateConfig(**FAST, seed=5))
    trainer.update("user:carol", alice(20), UpdateConfig(**FAST, seed=5))
    a, c = store.load("user:alice").tensors, store.load("user:carol").tensors
    # Equal up to BLAS rounding: MKL may pick kernels by memory alignment, which moves the last bits
    # (differences of ~1e-8 seen); a different seed moves the weights by orders of magnitude more.
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-6
    store.create("user:dave", LoraSettings(rank=4, seed=1))
    trainer.update("user:dave", alice(20), UpdateConfig(**FAST, seed=6))
    d = store.load("user:dave").tensors
    assert max(float((a[k] - d[k]).abs().max()) for k in a) > 1e-4


def test_base_stays_frozen_and_bit_identical(store, trainer, tiny_base):
    fp_before = fingerprint(Path(tiny_base))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits_before = trainer.model(ids).logits.clone()
    trainer.update("user:alice", alice(24), UpdateConfig(**FAST))
    trainer.update("user:alice", alice(24), UpdateConfig(**FAST, reg="ewc", fisher_samples=4, force=True))
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters())
    with torch.no_grad():
        assert torch.equal(trainer.model(ids).logits, logits_before)
    from persona.base import _compute_fingerprint, weight_files

    assert _compute_fingerprint(weight_files(Path(tiny_base))) == fp_before


def test_updating_one_user_leaves_another_untouched(store, trainer):
    bob_dir = store._adapter_dir("user:bob")
    before = file_hashes(bob_dir)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    bob = store.load("user:bob")
    bob_weights = AdapterWeights.from_peft(bob.tensors, bob.config)
    with torch.no_grad(), trainer.runtime.activate([Activation(bob_weights)]):
        bob_out = trainer.model(ids).logits.clone()
    trainer.update("user:alice", alice(), UpdateConfig(**FAST))
    assert file_hashes(bob_dir) == before
    with torch.no_grad(), trainer.runtime.activate([Activation(AdapterWeights.from_peft(store.load("user:bob").tensors, bob.config))]):
        assert torch.equal(trainer.model(ids).logits, bob_out)


def test_bad_data_trains_and_writes_nothing(store, trainer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": 3}\n')
    before = file_hashes(store.root)
    with pytest.raises(InvalidInteractions, match="bad.jsonl:2"):
        trainer.update("user:alice", read_interactions(bad), UpdateConfig(**FAST))
    with pytest.raises(InvalidInteractions):
        trainer.update("user:alice", [], UpdateConfig(**FAST))
    with pytest.raises(AdapterNotFound):
        trainer.update("user:nobody", alice(8), UpdateConfig(**FAST))
    after = file_hashes(store.root)
    assert {k: v for k, v in after.items() if not k.startswith(".locks")} == {k: v for k, v in before.items() if not k.startswith(".locks")}


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(InvalidConfig, match="unknown update option"):
        UpdateConfig.from_dict({"epochs": 1, "learning_rte": 0.1})
    for bad in ({"epochs": 0}, {"learning_rate": -1}, {"reg": "l3"}, {"holdout_fraction": 1.0}, {"batch_size": 0}):
        with pytest.raises(InvalidConfig):
            UpdateConfig.from_dict(bad)


def test_gate_keeps_a_forgetful_version_as_candidate_unless_forced(store, trainer):
    strong = dict(FAST, learning_rate=1e-2, epochs=3)
    trainer.update("user:alice", alice(), UpdateConfig(**strong))  # v2 current, replay filled
    bob = read_interactions(EXAMPLES / "bob.jsonl")
    # Other facts, no replay, no regularization, no tolerance: the replay loss rises, so it is refused.
    forgetful = dict(strong, replay_fraction=0.0, reg="none", max_forgetting=0.0, forgetting_floor=0.0)
    result = trainer.update("user:alice", bob, UpdateConfig(**forgetful))
    m = result.metrics
    assert m["replay_loss_after"] > m["replay_loss_before"]
    assert not result.promoted and "replay loss rose" in result.reason
    assert store.resolve("user:alice").version == 2
    assert store.resolve("user:alice@candidate").version == 3
    assert store.version_info("user:alice@v3").metrics["gate"] == {"promoted": False, "reason": result.reason, "forced": False}
    forced = trainer.update("user:alice", bob, UpdateConfig(**forgetful, force=True))
    assert forced.promoted and forced.reason.startswith("forced: replay loss rose")
    assert store.resolve("user:alice").version == 4


def test_gate_rules():
    def gate(held_before, held_after, replay_before, replay_after, config):
        d = decide(held_before, held_after, replay_before, replay_after, max_forgetting=config.max_forgetting,
                   forgetting_floor=config.forgetting_floor, force=config.force)
        return d.promoted, d.reason

    cfg = UpdateConfig(max_forgetting=0.1)
    nan = float("nan")
    assert gate(2.0, 1.5, 1.0, 1.05, cfg)[0] is True
    assert gate(2.0, 1.5, nan, nan, cfg)[0] is True  # no replay yet: nothing to forget
    promoted, reason = gate(2.0, 2.1, 1.0, 1.0, cfg)
    assert not promoted and "did not improve" in reason
    promoted, reason = gate(2.0, 1.5, 1.0, 1.2, cfg)
    assert not promoted and "over the 10.0% bound" in reason
    promoted, reason = gate(2.0, nan, 1.0, 1.0, cfg)
    assert not promoted and "no held-out data" in reason
    # Near zero, a relative bound reads noise as forgetting; the absolute floor (nats per token) does not.
    assert gate(2.0, 1.5, 0.001, 0.04, cfg)[0] is True
    promoted, reason = gate(2.0, 1.5, 0.001, 0.06, cfg)
    assert not promoted and "0.050-nat floor" in reason
    assert gate(2.0, 1.5, 0.001, 0.002, UpdateConfig(max_forgetting=0.1, forgetting_floor=0.0))[0] is False
    assert gate(2.0, 1.5, 0.0, 0.0, UpdateConfig(forgetting_floor=0.0))[0] is True
    with pytest.raises(InvalidConfig):
        UpdateConfig(forgetting_floor=-0.1)


def test_replay_buffer_fills_and_is_mixed_in(store, trainer):
    folder = store._adapter_dir("user:alice")
    trainer.update("user:alice", alice(), UpdateConfig(**FAST, replay_capacity=16))
    buffer = ReplayBuffer.read(folder)
    assert len(buffer.items) == 16 and buffer.seen == len(alice())
    assert set(buffer.items) <= set(alice())
    # supersede off: the tiny random model's embeddings are noise, and replay mixing is the subject here
    result = trainer.update("user:alice", alice(12), UpdateConfig(**FAST, replay_capacity=16, supersede=False))
    assert result.metrics["replay_examples"] == 16 and result.metrics["replay_loss_before"] is not None
    assert not (store._adapter_dir("user:bob") / "replay.jsonl").exists()


def test_replayed_rows_come_on_top_and_the_gate_evaluates_a_sample(store, trainer):
    trainer.update("user:alice", alice(), UpdateConfig(**FAST, replay_capacity=32))
    # supersede off: the tiny random model's embeddings are noise, and replay sampling is the subject here
    config = UpdateConfig(**FAST, replay_fraction=0.5, replay_capacity=32, gate_replay_samples=10, supersede=False)
    m = trainer.update("user:alice", alice(24), config).metrics
    # as many steps as the new data alone needs: replay adds rows to each batch, not batches
    assert m["replay_examples"] == 32 and m["steps"] == math.ceil(m["train_examples"] / 8)
    assert m["replay_eval_examples"] == 10 and m["replay_loss_before"] is not None


def test_training_precision_is_recorded_and_bf16_tracks_fp32(store, trainer):
    from persona.training.optimize import training_precision

    assert training_precision("auto", trainer.model) in ("fp32", "bf16")
    assert training_precision("fp32", trainer.model) == "fp32"
    metrics = {}
    for precision in ("fp32", "bf16"):
        result = trainer.update("user:alice", alice(), UpdateConfig(**FAST, precision=precision, force=True))
        info = store.version_info(f"user:alice@v{result.version.version}")
        assert info.training["precision_applied"] == precision
        metrics[precision] = result.metrics
        store.rollback("user:alice", 1)  # both start from the same parent
    fp32, bf16 = metrics["fp32"], metrics["bf16"]
    # same weights, same first batch: the first loss differs only by bf16 rounding
    assert fp32["train_loss_first"] != bf16["train_loss_first"]
    assert abs(bf16["train_loss_first"] / fp32["train_loss_first"] - 1) < 0.02
    for m in (fp32, bf16):  # both learn, about as well
        assert m["heldout_loss_after"] < m["heldout_loss_before"]
    assert abs(bf16["heldout_loss_after"] / fp32["heldout_loss_after"] - 1) < 0.05


def test_reservoir_is_bounded_and_uniform():
    items = parse_interactions("\n".join(json.dumps({"text": f"item {i}"}) for i in range(100)))
    counts = [0] * 100
    for seed in range(300):
        buf = ReplayBuffer((), 0)
        for k in range(0, 100, 10):  # offered in several updates
            buf = buf.offer(items[k:k + 10], capacity=20, seed=seed)
        assert len(buf.items) == 20 and buf.seen == 100
        for it in buf.items:
            counts[int(it.text.split()[1])] += 1
    # each item is kept with probability 0.2 -> about 60 of 300; early and late items alike
    assert min(counts) > 25 and max(counts) < 100
    assert abs(sum(counts[:50]) - sum(counts[50:])) < 0.2 * sum(counts)


def test_l2_regularization_pulls_toward_parent(store, trainer):
    trainer.update("user:alice", alice(), UpdateConfig(**FAST, replay_capacity=0))
    parent = store.load("user:alice").tensors
    store_path = store._adapter_dir("user:alice")

    def distance(strength):
        trainer.update("user:alice", read_interactions(EXAMPLES / "bob.jsonl")[:24],
                       UpdateConfig(**FAST, reg="l2", reg_strength=strength, force=True, replay_capacity=0))
        new = store.load("user:alice").tensors
        store.rollback("user:alice", 2)
        return sum(float(((new[k] - parent[k]) ** 2).sum()) for k in parent)

    assert distance(1000.0) < 0.5 * distance(0.0)
    assert (store_path / "v0003").is_dir() and (store_path / "v0004").is_dir()


def test_ewc_stores_fisher_beside_the_version(store, trainer):
    trainer.update("user:alice", alice(), UpdateConfig(**FAST, reg="ewc", fisher_samples=8))
    fisher = store.load_extra("user:alice@v2", "fisher")
    assert fisher is not None and set(fisher) == set(store.load("user:alice@v2").tensors)
    mean = torch.cat([t.flatten() for t in fisher.values()]).mean()
    assert abs(float(mean) - 1.0) < 1e-3 and all(bool((t >= 0).all()) for t in fisher.values())
    result = trainer.update("user:alice", alice(16), UpdateConfig(**FAST, reg="ewc", fisher_samples=8, force=True))
    assert store.version_info(result.version.ref).training["reg_applied"] == "ewc"
    assert store.verify().ok


def test_pending_queue_is_consumed_only_after_publish(store, trainer, monkeypatch):
    log_interactions(store, "user:alice", alice(10))
    log_interactions(store, "user:alice", alice()[10:16])
    assert store.show("user:alice").pending == 16

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "publish_version", fail)
    with pytest.raises(RuntimeError):
        trainer.update("user:alice", None, UpdateConfig(**FAST))
    assert store.show("user:alice").pending == 16  # nothing consumed when nothing was published
    monkeypatch.undo()
    result = trainer.update("user:alice", None, UpdateConfig(**FAST))
    assert result.version.version == 2 and store.show("user:alice").pending == 0
    with pytest.raises(InvalidInteractions, match="no pending interactions"):
        trainer.update("user:alice", None, UpdateConfig(**FAST))


def test_update_all_trains_every_adapter_with_pending(store, trainer):
    log_interactions(store, "user:alice", alice(12))
    log_interactions(store, "user:bob", read_interactions(EXAMPLES / "bob.jsonl")[:12])
    results = trainer.update_all(UpdateConfig(**FAST))
    assert sorted(r.adapter for r in results) == ["user:alice", "user:bob"]
    assert all(store.show(a).pending == 0 for a in ("user:alice", "user:bob"))


def test_interrupted_update_publishes_nothing_and_frees_the_lock(store, trainer, monkeypatch):
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupting_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.update("user:alice", alice(), UpdateConfig(**FAST))
    assert store.version_numbers("user:alice") == [1]
    assert not [p for p in store._adapter_dir("user:alice").iterdir() if p.name.startswith(".tmp")]
    quick = Store(store.root, lock_timeout=0.5)
    with quick.lock("user:alice"), quick.lock("user:alice", purpose="update"):
        pass


def _wait_until_catching_sigterm(pid: int, timeout: float = 120.0) -> None:
    """Block until process ``pid`` has a SIGTERM handler installed (bit 15 of SigCgt in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.1)
    raise AssertionError("the update never installed its SIGTERM handler")


def test_sigterm_during_cli_update_publishes_nothing(store, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(i.to_json()) + "\n" for i in alice() * 4))
    env = {**os.environ, "PERSONA_HOME": str(store.root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona", "update", "user:alice", "--data", str(data), "--epochs", "50", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_until_catching_sigterm(proc.pid)  # imports done, handler installed (a fixed sleep raced on a busy machine)
    time.sleep(1)  # and into the base load / training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert "nothing was published" in err
    assert store.version_numbers("user:alice") == [1] and store.verify().ok
    with Store(store.root, lock_timeout=0.5).lock("user:alice", purpose="update"):
        pass


def test_evaluate_versions_and_base(store, trainer):
    trainer.update("user:alice", alice(), UpdateConfig(**FAST))
    results = trainer.evaluate("user:alice", alice(10), ["v1", "v2", "base"])
    assert [r.version for r in results] == ["v0001", "v0002", "base"]
    v1, v2, base = results
    assert v1.loss == pytest.approx(base.loss, abs=1e-6)  # v1 is the identity (B = 0)
    assert v2.loss < v1.loss and v2.perplexity < v1.perplexity and v2.tokens == v1.tokens > 0


def test_evaluating_several_sets_in_one_pass_equals_each_alone(store, trainer):
    """Evaluator.losses scores the held-out slice and the replay sample together (issue 15): each set's loss and
    token count are what scoring it alone gives, whatever shared its batches; an empty set is NaN."""
    loaded = store.load("user:alice")
    weights = AdapterWeights.from_peft(loaded.tensors, loaded.config)
    held = list(trainer.tokenize(alice(5), 96).examples)
    replay = list(trainer.tokenize(alice()[5:30], 96).examples)
    together = trainer.evaluator.losses([held, replay, []], weights)
    for (loss, tokens), rows in zip(together, [held, replay]):
        alone = trainer.loss(rows, weights)
        assert tokens == alone[1] > 0
        assert loss == pytest.approx(alone[0], rel=1e-5)
    assert math.isnan(together[2][0]) and together[2][1] == 0
    assert trainer.evaluator.losses([held], None)[0][0] == pytest.approx(trainer.loss(held, None)[0], rel=1e-5)


def test_an_update_scores_heldout_and_replay_in_one_forward_per_version(store, trainer):
    """The gate's four losses (held-out and replay, parent and new weights) cost two forwards of the base when the
    slice and the sample fit one evaluation batch (they were 2 x (1 + 4) with batches of 8), and the training
    forwards are one per step."""
    trainer.update("user:alice", alice(), UpdateConfig(**FAST, replay_capacity=24))
    passes = {"eval": 0, "train": 0, "eval_rows": 0}

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_inference_mode_enabled():
            passes["eval"] += 1
            passes["eval_rows"] += ids.shape[0]
        elif torch.is_grad_enabled():
            passes["train"] += 1

    hook = trainer.model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    try:
        config = UpdateConfig(**FAST, replay_capacity=24, gate_replay_samples=24, supersede=False)
        m = trainer.update("user:alice", alice(20), config).metrics
    finally:
        hook.remove()
    assert m["replay_eval_examples"] == 24 and m["heldout_examples"] == 2
    assert passes["eval"] == 2 and passes["eval_rows"] == 2 * (24 + 2)
    assert passes["train"] == m["steps"]
