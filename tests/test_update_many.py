"""Multi-adapter training (issue 15): several adapters' steps in one batch, each training as it would alone."""

import errno
import json
from pathlib import Path

import pytest
import torch

from persona import LoraSettings, Store
from persona.interactions import read_interactions
from persona.lora_runtime import AdapterWeights
from persona.training import optimize as optimize_module
from persona.training.config import BulkConfig
from persona.training.optimize import Lane, train_step
from persona.training.regularize import Pull, anchor_of
from persona.training.trainer import Trainer, UpdateConfig, UpdateFailure, log_interactions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"
FP32 = dict(epochs=1, batch_size=3, max_length=64, precision="fp32", holdout_fraction=0.25)
PENDING = 8  # per adapter: 6 train rows (2 steps of 3), 2 held out
FILES = ["alice.jsonl", "bob.jsonl", "carol.jsonl"]
SHARED = BulkConfig(rows_per_step=64)  # the shared steps (the default, 0, is one adapter after another)


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    return Store.init(isolated_store, base=tiny_base)


@pytest.fixture
def trainer(store) -> Trainer:
    return Trainer(store)


def random_factors(trainer: Trainer, rank: int, seed: int, modules=None) -> dict:
    """Non-trivial factors (B not zero: LoRA's identity init would hide mix-ups between adapters)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in trainer.runtime.modules.items():
        if modules is None or name.rsplit(".", 1)[-1] in modules:
            out[name] = (torch.randn(rank, module.in_features, generator=g) * 0.1,
                         torch.randn(module.out_features, rank, generator=g) * 0.1)
    return out


def make_lane(trainer: Trainer, factors: dict, examples, *, dropout=0.1, reg="none", seed=0) -> Lane:
    params = {m: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for m, (a, b) in factors.items()}
    weights = AdapterWeights(params, 2.0, dropout)
    config = UpdateConfig(**FP32, seed=seed)
    pull = Pull(reg, 0.5, anchor_of(weights)) if reg != "none" else Pull()
    tokenized = trainer.tokenize(examples, 64)
    return Lane(weights, [], pull, tokenized, [], config, trainer.device)


def rows_of(trainer: Trainer, name: str, n: int):
    return list(trainer.tokenize(read_interactions(EXAMPLES / name)[:n], 64).examples)


def test_rows_masked_to_zero_loss_leave_that_adapters_factors_bit_identical(trainer):
    """An adapter whose rows carry no loss gets no optimizer step at all: not even Adam's momentum moves it."""
    factors = [random_factors(trainer, 4, seed) for seed in range(3)]
    rows = [rows_of(trainer, f, 4) for f in FILES]
    lanes = [make_lane(trainer, f, read_interactions(EXAMPLES / "alice.jsonl")[:4]) for f in factors]
    # a first step for all three: the masked adapter then has momentum that a zero-gradient step would apply
    train_step(trainer.model, trainer.runtime, list(zip(lanes, rows)), pad_id=trainer.pad_id)
    before = [{m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in lane.weights.factors.items()} for lane in lanes]
    masked = [type(e)(e.input_ids, tuple([-100] * len(e.labels))) for e in rows[1]]
    train_step(trainer.model, trainer.runtime, [(lanes[0], rows[0]), (lanes[1], masked), (lanes[2], rows[2])],
               pad_id=trainer.pad_id)
    assert all(torch.equal(a, before[1][m][0]) and torch.equal(b, before[1][m][1])
               for m, (a, b) in lanes[1].weights.factors.items())
    assert lanes[1].steps == 1 and lanes[0].steps == lanes[2].steps == 2
    for k in (0, 2):  # the others did train
        assert any(not torch.equal(a, before[k][m][0]) for m, (a, _) in lanes[k].weights.factors.items())


@pytest.mark.parametrize("reg", ["none", "l2"])
def test_each_adapters_gradient_equals_training_it_alone(trainer, reg):
    """Same rows per adapter, alone or beside two others (different ranks, one over fewer modules): the
    gradient and the step agree within 1e-5 in fp32, dropout included (each adapter's own stream)."""
    factors = [random_factors(trainer, 4, 0), random_factors(trainer, 8, 1),
               random_factors(trainer, 2, 2, modules={"q_proj", "v_proj"})]
    rows = [rows_of(trainer, f, n) for f, n in zip(FILES, (4, 3, 5))]
    data = read_interactions(EXAMPLES / "alice.jsonl")[:4]

    def lanes():
        return [make_lane(trainer, f, data, reg=reg, seed=7 + k) for k, f in enumerate(factors)]

    together = lanes()
    train_step(trainer.model, trainer.runtime, list(zip(together, rows)), pad_id=trainer.pad_id)
    for k, f in enumerate(factors):
        alone = lanes()[k]
        train_step(trainer.model, trainer.runtime, [(alone, rows[k])], pad_id=trainer.pad_id)
        assert alone.losses[0] == pytest.approx(together[k].losses[0], abs=1e-5)
        for m in f:
            for i in (0, 1):
                g_alone, g_together = alone.weights.factors[m][i].grad, together[k].weights.factors[m][i].grad
                assert torch.allclose(g_alone, g_together, atol=1e-5, rtol=0), (k, m, i)
                assert torch.allclose(alone.weights.factors[m][i], together[k].weights.factors[m][i], atol=1e-5, rtol=0)


def _setup_adapters(store: Store, trainer: Trainer, prefix: str) -> list[str]:
    """Three adapters with non-trivial weights: rank 4, rank 8, and a rank-4 one layered over a domain."""
    if not store.exists("domain:base-layer"):
        store.create("domain:base-layer", LoraSettings(rank=4, seed=3))
    refs = []
    for k, (rank, over) in enumerate([(4, None), (8, None), (4, "domain:base-layer")]):
        ref, template = f"user:{prefix}-{k}", f"user:template-{prefix}-{k}"
        store.create(template, LoraSettings(rank=rank, seed=k))
        loaded = store.load(template)
        noisy = {key: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(k)) for key, t in loaded.tensors.items()}
        store.create(ref, tensors=noisy, adapter_config=loaded.config, over=over)
        log_interactions(store, ref, read_interactions(EXAMPLES / FILES[k])[:PENDING])
        refs.append(ref)
    return refs


def test_bulk_update_equals_updating_each_alone(store, trainer):
    """Three adapters (ranks 4 and 8, one layered) updated in shared steps give what each update alone gives:
    the same steps, held-out losses within float noise, the same gate decisions, the pending queues consumed."""
    packed = _setup_adapters(store, trainer, "packed")
    alone = _setup_adapters(store, trainer, "alone")
    config = UpdateConfig(**FP32)
    together = trainer.update_many(packed, config, BulkConfig(rows_per_step=64))
    one_by_one = trainer.update_many(alone, config, BulkConfig(rows_per_step=0))
    assert [r.adapter for r in together] == packed
    for t, a in zip(together, one_by_one):
        assert not isinstance(t, UpdateFailure) and not isinstance(a, UpdateFailure), (t, a)
        assert (t.promoted, t.reason.split(":")[0]) == (a.promoted, a.reason.split(":")[0])
        assert t.metrics["steps"] == a.metrics["steps"] > 0
        for key in ("heldout_loss_after", "train_loss_last", "replay_loss_after"):
            if a.metrics[key] is not None:
                assert t.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4), key
        assert set(t.metrics) == set(a.metrics)
        assert store.show(t.adapter).pending == 0
        wt, wa = store.load(t.adapter).tensors, store.load(a.adapter).tensors
        assert all(torch.allclose(wt[k], wa[k], atol=1e-4) for k in wa)
    assert store.verify().ok


def test_steps_are_packed_within_the_row_budget(store, trainer, monkeypatch):
    refs = _setup_adapters(store, trainer, "budget")
    sizes = []
    real = optimize_module.train_step

    def spy(model, runtime, work, **kw):
        sizes.append([len(rows) for _, rows in work])
        return real(model, runtime, work, **kw)

    monkeypatch.setattr("persona.training.bulk.train_step", spy)
    config = UpdateConfig(**FP32)
    results = trainer.update_many(refs, config, BulkConfig(rows_per_step=8, max_adapters_per_step=2))
    assert all(not isinstance(r, UpdateFailure) for r in results)
    assert max(len(s) for s in sizes) == 2  # never more adapters than allowed
    assert all(sum(s) <= 8 or len(s) == 1 for s in sizes)  # within the budget (a batch is never split)
    assert sum(len(s) for s in sizes) == sum(r.metrics["steps"] for r in results)


def test_a_step_never_exceeds_its_token_budget(store, trainer, monkeypatch):
    """``tokens_per_step`` caps a shared step's padded tokens (rows x the step's longest row: what its memory
    grows with), alone or beside a row budget; only one adapter's batch, never split, may be larger."""
    refs = _setup_adapters(store, trainer, "tokens")
    steps = []
    real = optimize_module.train_step

    def spy(model, runtime, work, **kw):
        lengths = [len(r) for _, rows in work for r in rows]
        steps.append((len(work), len(lengths) * max(lengths)))
        return real(model, runtime, work, **kw)

    monkeypatch.setattr("persona.training.bulk.train_step", spy)
    one_batch = max(len(r) for ref in refs for r in rows_of(trainer, FILES[refs.index(ref)], PENDING)) * 3
    budget = 2 * one_batch  # room for about two adapters' batches
    results = trainer.update_many(refs, UpdateConfig(**FP32), BulkConfig(tokens_per_step=budget))
    assert all(not isinstance(r, UpdateFailure) for r in results)
    assert all(tokens <= budget or n == 1 for n, tokens in steps), steps
    assert any(n > 1 for n, _ in steps)  # it packs (tokens_per_step alone is not one after another)
    assert sum(n for n, _ in steps) == sum(r.metrics["steps"] for r in results)
    assert not BulkConfig(tokens_per_step=budget).sequential and BulkConfig().sequential


def test_pack_takes_a_batch_over_the_token_budget_only_alone():
    from persona.training.bulk import _pack

    class FakeLane:
        def __init__(self, lengths):
            self.rows = [tuple(range(n)) for n in lengths]

        def peek(self):
            return self.rows

    class FakeOpen:
        def __init__(self, lengths):
            self.lane = FakeLane(lengths)

    short, long_, huge = FakeOpen([10, 10]), FakeOpen([30, 5]), FakeOpen([500])
    assert _pack([short, long_], 0, 100) == [short]  # 4 rows padded to 30 = 120 > 100
    assert _pack([short, long_], 0, 120) == [short, long_]
    assert _pack([huge, short], 0, 100) == [huge]  # alone, whatever its size
    assert _pack([short, huge, long_], 0, 200) == [short, long_]  # the one left out goes first next step
    assert _pack([short, long_], 3, 0) == [short]  # the row budget still applies


def test_one_adapters_bad_pending_data_fails_with_its_reason_while_others_publish(store, trainer):
    refs = _setup_adapters(store, trainer, "bad")
    queue = store._adapter_dir(refs[1]) / "pending.jsonl"
    queue.write_bytes(queue.read_bytes() + b'{"messages": "not a list"}\n')
    results = trainer.update_many(refs, UpdateConfig(**FP32), SHARED)
    failure = results[1]
    assert isinstance(failure, UpdateFailure) and failure.error == "InvalidInteractions"
    assert f"pending.jsonl:{PENDING + 1}" in failure.reason
    assert failure.to_dict() == {"adapter": refs[1], "error": {"type": "InvalidInteractions", "message": failure.reason}}
    assert store.version_numbers(refs[1]) == [1] and store.show(refs[1]).pending == PENDING + 1
    for k in (0, 2):
        assert results[k].version.version == 2 and store.show(refs[k]).pending == 0


def test_a_nan_loss_fails_that_adapter_only(store, trainer, monkeypatch):
    refs = _setup_adapters(store, trainer, "nan")
    real = optimize_module.loss_sums
    calls = []

    def poisoned(model, batch, blocks):
        sums = real(model, batch, blocks)
        calls.append(len(blocks))
        if len(calls) == 1:  # the second adapter's block of the first shared step
            sums[1] = (sums[1][0] * float("nan"), sums[1][1])
        return sums

    monkeypatch.setattr(optimize_module, "loss_sums", poisoned)
    results = trainer.update_many(refs, UpdateConfig(**FP32), SHARED)
    assert isinstance(results[1], UpdateFailure) and results[1].error == "NonFiniteWeights"
    assert "training loss became nan" in results[1].reason
    assert store.version_numbers(refs[1]) == [1] and store.show(refs[1]).pending == PENDING
    assert calls[0] == 3 and [results[k].version.version for k in (0, 2)] == [2, 2], results


def test_crash_after_one_adapter_published_leaves_the_next_untouched(store, trainer, monkeypatch):
    """A kill between two publishes: the first adapter is published and its queue consumed, the second
    is as it was (no version, pending kept), and no lock stays held."""
    refs = _setup_adapters(store, trainer, "crash")[:2]
    real = store.publish_version
    calls = []

    def publish_then_die(ref, *a, **k):
        calls.append(ref)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ref, *a, **k)

    monkeypatch.setattr(store, "publish_version", publish_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.update_many(refs, UpdateConfig(**FP32), SHARED)
    assert store.version_numbers(refs[0]) == [1, 2] and store.show(refs[0]).pending == 0
    assert store.version_numbers(refs[1]) == [1] and store.show(refs[1]).pending == PENDING
    quick = Store(store.root, lock_timeout=0.5)
    for ref in refs:
        with quick.lock(ref, purpose="update"), quick.lock(ref):
            pass
    monkeypatch.undo()
    (result,) = trainer.update_many([refs[1]], UpdateConfig(**FP32), SHARED)  # the next run picks it up
    assert result.version.version == 2 and store.show(refs[1]).pending == 0


@pytest.mark.parametrize("bulk", [SHARED, BulkConfig(rows_per_step=0)], ids=["packed", "one-after-another"])
def test_a_full_disk_stops_the_whole_run_with_that_error(store, trainer, monkeypatch, bulk):
    """ENOSPC at a publish fails every adapter alike: the run raises it at once (the CLI's one
    'Error:' line) instead of training the others to fail the same way; nothing published, locks free."""
    refs = _setup_adapters(store, trainer, "full" + str(bulk.rows_per_step))[:2]
    calls = []

    def full_disk(ref, *a, **k):
        calls.append(ref)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "publish_version", full_disk)
    with pytest.raises(OSError) as raised:
        trainer.update_many(refs, UpdateConfig(**FP32), bulk)
    assert raised.value.errno == errno.ENOSPC and len(calls) == 1  # the second adapter never reached its publish
    for ref in refs:
        assert store.version_numbers(ref) == [1] and store.show(ref).pending == PENDING
    quick = Store(store.root, lock_timeout=0.5)
    for ref in refs:
        with quick.lock(ref, purpose="update"), quick.lock(ref):
            pass


def test_cli_update_all_json_reports_each_adapter_and_fails_with_status_1(run_cli, tmp_path):
    for name in ("ann", "ben", "cat"):
        run_cli("create", f"user:{name}", "--rank", "4")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n" for i in range(6)))
    for name in ("ann", "ben", "cat"):
        run_cli("log", f"user:{name}", "--data", good)
    single = json.loads(run_cli("update", "user:cat", "--epochs", "1", "--json").output)
    run_cli("log", "user:cat", "--data", good)
    out = run_cli("update", "--all", "--epochs", "1", "--rows-per-step", "32", "--json")
    results = json.loads(out.output)
    assert [r["adapter"] for r in results] == ["user:ann", "user:ben", "user:cat"]
    assert all(set(r) == set(single) and set(r["metrics"]) == set(single["metrics"]) for r in results)
    assert [r["version"] for r in results] == [2, 2, 3]

    for name in ("ann", "ben"):
        run_cli("log", f"user:{name}", "--data", good)
    queue = Path(Store.open().root) / "user" / "ben" / "pending.jsonl"
    queue.write_text(queue.read_text() + "not json\n")
    out = run_cli("update", "--all", "--epochs", "1", "--json", ok=False)
    assert out.exit_code == 1
    results = json.loads(out.stdout)
    assert results[0]["version"] == 3 and results[1]["error"]["type"] == "InvalidInteractions"
    text = run_cli("update", "--all", "--epochs", "1", ok=False)
    assert text.exit_code == 1 and "user:ben: FAILED, nothing published (InvalidInteractions)" in text.output
    usage = run_cli("update", "user:ann", "--rows-per-step", "8", ok=False)
    assert usage.exit_code == 2 and "--rows-per-step" in usage.output
    usage = run_cli("update", "user:ann", "--tokens-per-step", "512", ok=False)
    assert usage.exit_code == 2 and "--tokens-per-step" in usage.output
    run_cli("log", "user:ann", "--data", good)
    packed = json.loads(run_cli("update", "--all", "--epochs", "1", "--tokens-per-step", "256", "--json", ok=False).stdout)
    assert [r["adapter"] for r in packed] == ["user:ann", "user:ben"]  # ben's queue is still broken
    assert packed[0]["version"] == 4 and packed[1]["error"]["type"] == "InvalidInteractions"
