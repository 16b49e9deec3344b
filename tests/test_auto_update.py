"""The server's learning loop (``persona serve --log-interactions --auto-update POLICY``, issue 15).

The policy grammar and the scheduler's decisions are tested in-process (a fake clock, a stand-in
worker), and so is the quarantine of an adapter whose update fails, with a real worker over the tiny
model; the loop itself for real: a server subprocess over a tiny store, chats logged, a worker
process running ``persona update --all``, the next answer from the new version, the failure of a
worker and the shutdown of a server whose worker is training. Every wait is bounded; nothing
asserts how long anything took.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from datetime import time as clock_time
from pathlib import Path

import httpx
import pytest

from persona import LoraSettings, Store
from persona.errors import AdapterNotFound, DamagedAdapter, InvalidConfig, InvalidReference, LockTimeout
from persona.http.autoupdate import AutoUpdateCollector, AutoUpdater, AutoUpdateSettings, FailedUpdate, read_outcome
from persona.http.update_policy import QuietHours, UpdatePolicy, parse_policy
from persona.interactions import Interaction
from persona.refs import AdapterRef
from persona.store import NewVersion, PendingFingerprint
from persona.store.tokens import TokenStore

ROOT = Path(__file__).resolve().parents[1]
WAIT = 180  # seconds a wait may take before the test fails (never reached when things work)
CHAT = {"model": "user:alice", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
        "temperature": 0}
# Tiny training: identical chats, so the held-out row (one of 4) is what the others teach, and the gate promotes.
TRAIN = "--epochs 20 --lr 0.003 --holdout 0.25 --min-pending 1"  # these tests log one chat or two at a time


# ----------------------------------------------------------------------------- the policy
@pytest.mark.parametrize("text, expected", [
    ("pending>=2", UpdatePolicy(min_pending=2)),
    ("pending >= 32", UpdatePolicy(min_pending=32)),
    ("every=30m", UpdatePolicy(every_s=1800)),
    ("every=90s", UpdatePolicy(every_s=90)),
    ("every=1d", UpdatePolicy(every_s=86400)),
    ("pending>=32,every=1h", UpdatePolicy(min_pending=32, every_s=3600)),
    (" every=2h , pending>=8 ", UpdatePolicy(min_pending=8, every_s=7200)),
    ("pending>=4,quiet=22:00-06:00", UpdatePolicy(min_pending=4, quiet=QuietHours(clock_time(22), clock_time(6)))),
    ("every=1h,quiet=01:30-02:45", UpdatePolicy(every_s=3600, quiet=QuietHours(clock_time(1, 30), clock_time(2, 45)))),
])
def test_policy_grammar_accepts(text, expected):
    policy = parse_policy(text)
    assert policy == expected
    assert parse_policy(str(policy)) == policy  # str() is the canonical policy, read back the same


@pytest.mark.parametrize("text, says", [
    ("", "empty clause"),
    ("pending>=2,", "empty clause"),
    ("pending>=0", "from 1"),
    ("pending>=x", "whole number"),
    ("pending>2", "cannot read"),
    ("every=1w", "duration"),
    ("every=0m", "duration"),
    ("every=1.5h", "duration"),
    ("every=367d", "366d"),
    ("quiet=22:00-06:00", "give a trigger"),
    ("pending>=2,quiet=22-06", "HH:MM"),
    ("pending>=2,quiet=24:00-06:00", "HH:MM"),
    ("pending>=2,quiet=22:00", "HH:MM-HH:MM"),
    ("pending>=2,quiet=06:00-06:00", "empty"),
    ("pending>=2,pending>=3", "given twice"),
    ("often=1h", "unknown clause 'often'"),
])
def test_policy_grammar_refuses_naming_the_fault(text, says):
    with pytest.raises(InvalidConfig, match=re.escape(says)) as caught:
        parse_policy(text)
    assert "pending>=N" in str(caught.value)  # and shows the grammar


def test_quiet_hours_wrap_midnight_start_inclusive_end_exclusive():
    night = parse_policy("pending>=1,quiet=22:00-06:00").quiet
    assert [clock_time(h, m) in night for h, m in ((21, 59), (22, 0), (23, 30), (0, 0), (5, 59), (6, 0), (12, 0))] == [
        False, True, True, True, True, False, False]
    lunch = parse_policy("pending>=1,quiet=12:00-13:00").quiet
    assert [clock_time(h, m) in lunch for h, m in ((11, 59), (12, 0), (12, 59), (13, 0), (0, 0))] == [
        False, True, True, False, False]


def test_policy_due_per_adapter_rows_or_time_since_last_run():
    policy = parse_policy("pending>=3,every=1h")
    assert policy.due({}, 10**6) is None  # nothing pending: no run, whatever the time
    assert policy.due({"user:a": 2, "user:b": 2}, 60) is None  # 4 rows, but no adapter has 3
    assert "user:b has 3" in policy.due({"user:a": 2, "user:b": 3}, 60)
    assert "since the last run" in policy.due({"user:a": 1}, 3600)
    assert parse_policy("pending>=3").due({"user:a": 1}, 10**6) is None


# ----------------------------------------------------------------------------- the scheduler, in-process
class FakeStore:
    """Pending rows per adapter (``pending``) and version numbers (``versions``, [1] unless set)."""

    def __init__(self, pending, versions=None):
        self.pending = pending
        self.versions = versions or {}

    def pending_counts(self):
        return {adapter: rows for adapter, rows in self.pending.items() if rows}

    def pending_fingerprint(self, adapter):
        return PendingFingerprint(self.pending.get(adapter, 0), f"digest of {self.pending.get(adapter, 0)} rows")

    def version_numbers(self, adapter):
        return self.versions.get(adapter, [1])


@dataclass(frozen=True)
class ScriptedWorker(AutoUpdateSettings):
    """The loop with a stand-in worker: a Python one-liner instead of `persona update --all`."""

    script: str = "print('[]')"

    def command(self, exclude=()):
        return [sys.executable, "-c", self.script, *exclude]  # the script sees the excluded adapters in sys.argv


def scripted(policy: str, script: str, min_pending: int = 1) -> ScriptedWorker:
    return ScriptedWorker(parse_policy(policy), "unused", backoff_s=60, script=script, min_pending=min_pending)


def test_scheduler_runs_when_due_never_in_quiet_hours_and_backs_off_after_a_failure():
    now = [1000.0]
    local = [datetime(2026, 1, 1, 23, 0)]
    error = '{"error": {"type": "InvalidInteractions", "message": "bad line"}}'
    fail = f"import sys; print({error!r}, file=sys.stderr); sys.exit(1)"
    updater = AutoUpdater(FakeStore({"user:a": 5}), scripted("pending>=2,quiet=22:00-06:00", fail),
                          clock=lambda: now[0], local_now=lambda: local[0])
    assert updater.check() is None  # 23:00 is quiet
    assert updater.stats().pending_rows == 5 and updater.stats().adapters_pending == 1
    local[0] = datetime(2026, 1, 1, 6, 0)
    outcome = updater.check()
    assert outcome is not None and not outcome.ok and outcome.error == "InvalidInteractions: bad line"
    assert updater.stats().runs == {"ok": 0, "failed": 1} and updater.stats().failures_in_a_row == 1
    now[0] += 59
    assert updater.check() is None  # backing off: 60 s after the first failure
    now[0] += 2
    assert updater.check() is not None  # then tried again, and failed again: the back-off doubles
    now[0] += 100
    assert updater.check() is None
    now[0] += 21
    assert updater.check() is not None and updater.stats().runs["failed"] == 3


def test_scheduler_counts_promoted_rejected_and_failed_updates_from_the_json():
    out = ('[{"adapter": "user:a", "label": "v0002", "promoted": true}, '
           '{"adapter": "user:b", "label": "v0003", "promoted": false}, {"adapter": "user:c", "error": "bad"}]')
    updater = AutoUpdater(FakeStore({"user:a": 2}), scripted("pending>=2", f"print({out!r})"))
    outcome = updater.check()
    assert outcome.ok and outcome.promoted == ("user:a@v0002",) and outcome.rejected == ("user:b@v0003",)
    assert updater.stats().updates == {"promoted": 1, "rejected": 1, "failed": 1}
    assert updater.stats().runs == {"ok": 1, "failed": 0} and not updater.stats().running
    assert updater.stats().last_run_seconds is not None


@dataclass(frozen=True)
class MissingWorker(AutoUpdateSettings):
    def command(self, exclude=()):
        return [str(ROOT / "no-such-python")]


def test_a_worker_that_cannot_start_is_a_failed_run_backed_off():
    now = [0.0]
    updater = AutoUpdater(FakeStore({"user:a": 3}), MissingWorker(parse_policy("pending>=1"), "unused", min_pending=1),
                          clock=lambda: now[0])
    outcome = updater.check()
    assert outcome.error.startswith("cannot start the worker") and updater.stats().runs["failed"] == 1
    assert not updater.stats().running and updater.check() is None  # backing off


def test_every_counts_from_the_start_then_from_the_last_run():
    now = [0.0]
    updater = AutoUpdater(FakeStore({"user:a": 1}), scripted("every=1h", "print('[]')"), clock=lambda: now[0])
    now[0] = 3599
    assert updater.check() is None
    now[0] = 3600
    assert updater.check() is not None
    now[0] = 3600 + 3599
    assert updater.check() is None


ENOSPC = '{"error": {"type": "OSError", "message": "No space left on device: /store/user/a/v0002"}}'


@pytest.mark.parametrize("code, stdout, stderr, error", [
    (-9, "", "", "exit status -9"),  # killed (out of memory): no output at all
    (1, "", "Traceback ...\nRuntimeError: boom\n", "Traceback ...\nRuntimeError: boom"),
    (1, "", ENOSPC, "OSError: No space left on device: /store/user/a/v0002"),  # store-wide: the run stops
    (0, "not json", "", "output is not a JSON list"),
    (1, '[{"adapter": "user:a", "label": "v0002", "promoted": true}]', "", "exit status 1"),  # 1, yet none failed
    (-9, '[{"adapter": "user:a", "error": "bad"}]', "", "exit status -9"),  # killed after its report
    (0, "[]", "", None),
    (0, "", "", None),
])
def test_a_crashed_worker_is_a_failed_run_with_its_reason(code, stdout, stderr, error):
    outcome = read_outcome(code, 1.0, stdout, stderr)
    assert outcome.error == error and outcome.ok == (error is None)


def test_a_bulk_run_that_went_on_past_a_failed_adapter_worked_as_a_run_and_says_why_the_adapter_failed():
    out = ('[{"adapter": "user:a", "label": "v0002", "promoted": true}, '
           '{"adapter": "user:b", "error": {"type": "InvalidInteractions", "message": "pending.jsonl:2: bad"}}]')
    outcome = read_outcome(1, 1.0, out, "")  # `update --all` exits 1 when an adapter failed
    assert outcome.promoted == ("user:a@v0002",)
    assert outcome.failed == (FailedUpdate("user:b", "InvalidInteractions: pending.jsonl:2: bad"),)
    assert outcome.ok and outcome.error is None  # one adapter's failure is not the run's


def test_worker_stderr_in_the_log_is_cut_to_its_end():
    outcome = read_outcome(1, 1.0, "", "x" * 10_000 + "THE END", log_chars=100)
    assert outcome.error.endswith("THE END") and len(outcome.error) == 103


# ----------------------------------------------------------------------------- quarantine of a failing adapter
# `persona update --all` as it reports a broken user:b beside a healthy user:a: b fails unless excluded.
BROKEN_B = (
    "import json, sys\n"
    "out = [{'adapter': 'user:a', 'label': 'v0002', 'promoted': True}]\n"
    "if 'user:b' not in sys.argv[1:]:\n"
    "    out.append({'adapter': 'user:b', 'error': {'type': 'InvalidInteractions', 'message': 'pending.jsonl:2: bad'}})\n"
    "print(json.dumps(out))\n"
    "sys.exit(1 if len(out) > 1 else 0)\n"
)


@pytest.fixture
def loop_log(caplog, monkeypatch):
    """The loop's log messages (its logger stops propagating once a server in this process started it)."""
    monkeypatch.setattr(logging.getLogger("persona.autoupdate"), "propagate", True)
    caplog.set_level(logging.INFO, logger="persona.autoupdate")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "persona.autoupdate"]


def test_a_failed_adapter_is_quarantined_without_back_off_and_left_out_until_its_queue_changes(loop_log):
    store = FakeStore({"user:a": 2, "user:b": 5})
    updater = AutoUpdater(store, scripted("pending>=2", BROKEN_B), clock=lambda: 1000.0)  # time stands still
    first = updater.check()
    assert first.ok and first.promoted == ("user:a@v0002",) and [f.adapter for f in first.failed] == ["user:b"]
    stats = updater.stats()
    assert stats.runs == {"ok": 1, "failed": 0} and stats.failures_in_a_row == 0 and stats.quarantined == 1
    assert stats.updates == {"promoted": 1, "rejected": 0, "failed": 1}
    second = updater.check()  # at once (a back-off would wait 60 s) and without b (the script reports it otherwise)
    assert second is not None and second.ok and not second.failed and second.promoted == ("user:a@v0002",)
    store.pending = {"user:b": 5}
    assert updater.check() is None and updater.check() is None  # rows that cannot train trigger nothing
    assert updater.stats().pending_rows == 5 and updater.stats().quarantined == 1  # but are still shown
    said = [line for line in loop_log() if line.startswith("quarantined user:b")]
    assert len(said) == 1 and "InvalidInteractions: pending.jsonl:2: bad" in said[0]  # once, not every check
    store.pending = {"user:b": 6}  # a chat logged to b
    third = updater.check()
    assert third is not None and [f.adapter for f in third.failed] == ["user:b"]  # tried again, failed again
    assert "user:b is tried again at the next run: its pending queue changed" in loop_log()
    assert len([line for line in loop_log() if line.startswith("quarantined user:b")]) == 2
    assert updater.stats().runs == {"ok": 3, "failed": 0} and updater.stats().updates["failed"] == 2


def test_a_new_version_or_an_emptied_queue_lifts_the_quarantine(loop_log):
    store = FakeStore({"user:a": 2, "user:b": 5})
    updater = AutoUpdater(store, scripted("pending>=2", BROKEN_B), clock=lambda: 0.0)
    updater.check()
    store.pending = {"user:b": 5}
    assert updater.check() is None and updater.stats().quarantined == 1
    store.versions["user:b"] = [1, 2]  # a person's `persona update user:b --data fixed.jsonl` published v2
    assert updater.check() is not None  # so b is tried again (and fails again: its queue is still bad)
    assert "user:b is tried again at the next run: a new version (v0002) was published" in loop_log()
    store.pending = {}  # `persona update user:b` trained on its queue (or `persona forget` emptied it)
    assert updater.check() is None and updater.stats().quarantined == 0
    assert "user:b is tried again at the next run: its pending queue is empty" in loop_log()


def test_a_run_that_fails_as_a_whole_still_backs_off_and_quarantines_nobody():
    now = [0.0]
    full_disk = f"import sys; print({ENOSPC!r}, file=sys.stderr); sys.exit(1)"
    updater = AutoUpdater(FakeStore({"user:a": 2, "user:b": 3}), scripted("pending>=2", full_disk),
                          clock=lambda: now[0])
    outcome = updater.check()
    assert not outcome.ok and outcome.error.startswith("OSError: No space left on device")
    assert updater.stats().runs == {"ok": 0, "failed": 1} and updater.stats().quarantined == 0
    now[0] += 59
    assert updater.check() is None  # backing off
    now[0] += 1
    assert updater.check() is not None and updater.stats().failures_in_a_row == 2


def test_metrics_show_the_quarantined_adapters_and_the_per_result_counts():
    from prometheus_client import CollectorRegistry, generate_latest

    updater = AutoUpdater(FakeStore({"user:a": 2, "user:b": 5}), scripted("pending>=2", BROKEN_B))
    registry = CollectorRegistry()
    registry.register(AutoUpdateCollector(updater))
    assert "persona_auto_update_quarantined_adapters 0.0" in generate_latest(registry).decode()
    updater.check()
    text = generate_latest(registry).decode()
    assert "persona_auto_update_quarantined_adapters 1.0" in text
    assert 'persona_auto_updates_total{result="failed"} 1.0' in text
    assert 'persona_auto_updates_total{result="promoted"} 1.0' in text
    assert 'persona_auto_update_runs_total{result="ok"} 1.0' in text
    assert 'persona_auto_update_runs_total{result="failed"} 0.0' in text


def test_the_worker_command_excludes_the_quarantined_adapters():
    settings = AutoUpdateSettings(parse_policy("pending>=1"), "/store", update_args=("--epochs", "1"))
    command = settings.command(exclude=("user:b", "user:c"))
    assert command[command.index("update"):] == [
        "update", "--all", "--json", "--origin", "auto-update", "--store", "/store", "--device", "auto", "--dtype",
        "auto", "--min-pending", "4", "--exclude", "user:b", "--exclude", "user:c", "--epochs", "1"]
    assert "--exclude" not in settings.command()


def test_adapters_with_too_few_rows_for_a_held_out_slice_neither_trigger_nor_join_a_run():
    """An update of fewer than 4 rows holds none out and can only become a candidate, consuming the rows:
    such an adapter waits for more (found by a cold trial: pending>=2 turned every chat into candidates)."""
    updater = AutoUpdater(FakeStore({"user:a": 3, "user:b": 2}), scripted("pending>=2", "print('[]')", min_pending=4))
    assert updater.check() is None  # 3 and 2 rows: below 4, nothing is due
    assert updater.stats().pending_rows == 5  # /metrics still shows every pending row
    updater = AutoUpdater(FakeStore({"user:a": 4, "user:b": 2}), scripted("pending>=2", "print('[]')", min_pending=4))
    assert updater.check() is not None  # user:a reached 4; the worker leaves user:b out (its --min-pending 4:
    # test_the_worker_command_excludes_the_quarantined_adapters, test_update_all_min_pending_leaves_small_queues...)


def test_auto_update_args_min_pending_overrides_the_servers_default():
    from persona.cli.serve import min_pending_of

    assert min_pending_of(("--epochs", "1")) == {}
    assert min_pending_of(("--min-pending", "1", "--force")) == {"min_pending": 1}
    assert min_pending_of(("--min-pending=12",)) == {"min_pending": 12}


def test_update_all_min_pending_leaves_small_queues_untouched(store):
    from persona.training.trainer import Trainer

    store.log("user:alice", [chat("a"), chat("b"), chat("c")])
    store.log("user:bob", [chat("d")])
    trainer = Trainer(store)
    assert trainer.pending_adapters(min_pending=1) == [AdapterRef("user", "alice"), AdapterRef("user", "bob")]
    assert trainer.pending_adapters(min_pending=3) == [AdapterRef("user", "alice")]
    assert trainer.pending_adapters(min_pending=4) == []


# ----------------------------------------------------------------------------- store: pending counts and origin
@pytest.fixture
def store(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:bob", 2)):
        store.create(ref, LoraSettings(init="random", seed=seed, rank=4))
    return store


def cli(*args: str) -> str:
    """The persona CLI in-process over the test's store (``$PERSONA_HOME``); its output."""
    from click.testing import CliRunner

    from persona.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def chat(text: str) -> Interaction:
    return Interaction.from_json({"messages": [{"role": "user", "content": text},
                                               {"role": "assistant", "content": "ok"}]})


def test_pending_counts_are_rows_per_adapter_with_rows(store):
    assert store.pending_counts() == {}
    store.log("user:alice", [chat("a"), chat("b")])
    store.log("user:bob", [chat("c")])
    assert store.pending_counts() == {"user:alice": 2, "user:bob": 1}
    batch = store.take_pending("user:alice")
    store.consume_pending("user:alice", batch, 1)
    assert store.pending_counts() == {"user:bob": 1}


def test_pending_fingerprint_changes_with_every_change_to_the_queue_and_only_then(store):
    empty = store.pending_fingerprint("user:alice")
    assert empty.rows == 0
    store.log("user:alice", [chat("a"), chat("b")])
    two = store.pending_fingerprint("user:alice")
    assert two.rows == 2 and two != empty and store.pending_fingerprint("user:alice") == two
    assert two.digest == store.take_pending("user:alice").digest  # the store's own digest of the whole queue
    pending = store.root / "user" / "alice" / "pending.jsonl"
    pending.write_bytes(pending.read_bytes().replace(b'"a"', b'"c"'))  # the same rows, one of them changed
    assert store.pending_fingerprint("user:alice").rows == 2 and store.pending_fingerprint("user:alice") != two
    with pytest.raises(AdapterNotFound):
        store.pending_fingerprint("user:nobody")


def damage_queue(store: Store, ref: str) -> None:
    """One good row, then a line that is not an interaction: the adapter's update fails at every try."""
    store.log(ref, [chat("fine")])
    pending = store.root / ref.replace(":", "/") / "pending.jsonl"
    pending.write_bytes(pending.read_bytes() + b'{"not": "an interaction"}\n')


def test_a_broken_adapter_does_not_hold_back_a_healthy_one_and_is_retried_after_a_new_log(store, monkeypatch,
                                                                                        loop_log):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the worker is `python -m persona update --all` of this tree
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    damage_queue(store, "user:bob")
    bobs_queue = store.pending_fingerprint("user:bob")
    store.log("user:alice", [chat("hi")] * 4)
    settings = AutoUpdateSettings(parse_policy("pending>=1"), str(store.root), update_args=tuple(TRAIN.split()),
                                  min_pending=1)
    updater = AutoUpdater(store, settings, clock=lambda: 1000.0)  # time stands still: a back-off would stop runs
    first = updater.check()
    assert first.ok and [f.adapter for f in first.failed] == ["user:bob"], first
    assert "InvalidInteractions" in first.failed[0].reason and "user/bob/pending.jsonl" in first.failed[0].reason
    assert store.version_numbers("user:alice") == [1, 2] and updater.stats().quarantined == 1
    store.log("user:alice", [chat("hello")] * 4)
    second = updater.check()  # no back-off; bob is left out (`--exclude user:bob`), so nothing failed
    assert second is not None and second.ok and not second.failed, second
    assert store.version_numbers("user:alice") == [1, 2, 3] and store.pending_counts() == {"user:bob": 2}
    assert store.pending_fingerprint("user:bob") == bobs_queue and store.version_numbers("user:bob") == [1]
    assert updater.check() is None  # bob's rows alone do not trigger pending>=1: they cannot train
    store.log("user:bob", [chat("one more")])
    third = updater.check()  # a new log to bob: tried again (and, its bad line still queued, failed again)
    assert third is not None and [f.adapter for f in third.failed] == ["user:bob"] and not third.promoted
    assert updater.stats().runs == {"ok": 3, "failed": 0} and updater.stats().updates["failed"] == 2
    assert len([line for line in loop_log() if line.startswith("quarantined user:bob")]) == 2


def test_update_all_exclude_is_refused_without_all_and_checked_before_loading(run_cli):
    assert "--exclude leaves adapters out of --all" in run_cli("update", "user:a", "--exclude", "user:b", ok=False).output
    assert "--exclude leaves adapters out of --all" in run_cli("update", "--exclude", "user:b", ok=False).output
    assert "invalid reference" in run_cli("update", "--all", "--exclude", "bob", ok=False).output
    for versioned in ("user:b@v1", "user:b@current", "domain:auto"):
        assert "name an adapter as KIND:NAME" in run_cli("update", "--all", "--exclude", versioned, ok=False).output
    assert "--min-pending applies to --all" in run_cli("update", "user:a", "--min-pending", "2", ok=False).output
    result = run_cli("update", "--all", "--exclude", "user:nobody")
    assert "note: --exclude user:nobody: no such adapter" in result.output
    assert "no adapter to update" in result.output  # nothing pending in this store


def test_origin_is_recorded_shown_and_absent_on_old_versions(store):
    loaded = store.load("user:alice")
    new = NewVersion(loaded.tensors, loaded.config, parent=1, origin="auto-update")
    info = store.publish_version("user:alice", new)
    assert info.origin == "auto-update" and store.version_info("user:alice@v1").origin is None
    meta = (store.version_folder("user:alice@v1") / "meta.json").read_text()
    assert '"origin"' not in meta  # only where set: a person's versions are written as before
    shown = cli("show", "user:alice")
    assert re.search(r"v0002 \[current\] parent=v1 .*from auto-update", shown)
    assert "from" not in shown.split("v0001")[1].split("\n")[0]
    import json

    versions = json.loads(cli("show", "user:alice", "--json"))["versions"]
    assert [v.get("origin") for v in versions] == [None, "auto-update"] and "origin" not in versions[0]
    with pytest.raises(InvalidReference, match="origin"):  # a tag, checked by the one meta.json parser
        store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1, origin="Not A Tag!"))


def test_a_meta_json_with_a_malformed_origin_is_damaged(store):
    from persona.store.records import parse_meta

    raw = (store.version_folder("user:alice@v1") / "meta.json").read_bytes()
    with pytest.raises(DamagedAdapter, match="origin"):
        parse_meta(raw.replace(b'"format"', b'"origin": 7, "format"', 1), adapter="user:alice", version=1)


# ----------------------------------------------------------------------------- the CLI's refusals
@pytest.mark.parametrize("args, says", [
    (["--auto-update", "pending>=0", "--log-interactions"], "from 1"),
    (["--auto-update", "pending>=2"], "add --log-interactions"),
    (["--auto-update", "pending>=2", "--log-interactions", "--upstream", "http://127.0.0.1:9"], "gateway"),
    (["--auto-update-args", "--epochs 1"], "needs --auto-update"),
    (["--auto-update", "pending>=2", "--log-interactions", "--auto-update-args", "--epochz 1"], "No such option"),
    (["--auto-update", "pending>=2", "--log-interactions", "--auto-update-args", "--epochs 0"], "--epochs"),
    (["--auto-update", "pending>=2", "--log-interactions", "--auto-update-args", "--store /tmp"], "set by the server"),
    (["--auto-update", "pending>=2", "--log-interactions", "--auto-update-args", "user:bob"], "unexpected argument"),
    (["--auto-update", "pending>=2", "--log-interactions", "--auto-update-args", "'--epochs"], "quotation"),
])
def test_serve_refuses_a_bad_auto_update_before_loading_anything(run_cli, args, says):
    result = run_cli("serve", *args, ok=False)
    assert result.exit_code == 2 and says in result.output, result.output


def test_auto_update_options_stay_out_of_update_help(run_cli):
    assert "--origin" not in run_cli("update", "--help").output


# ----------------------------------------------------------------------------- end to end, a real server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``persona serve`` in a subprocess, its stderr in a file."""

    def __init__(self, root: Path, log: Path, *args: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with log.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "persona", "serve", "--store", str(root),
                                          "--port", self.url.rsplit(":", 1)[1], "--log-interactions", *args],
                                         env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + WAIT
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "persona serve did not start"
            time.sleep(0.2)

    def chat(self, token: str) -> httpx.Response:
        answer = httpx.post(self.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token}"},
                            timeout=WAIT)
        assert answer.status_code == 200, answer.text
        return answer

    def metric(self, token: str, name: str) -> float | None:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    def wait_metric(self, token: str, name: str, value: float) -> None:
        deadline = time.time() + WAIT
        while self.metric(token, name) != value:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.time() < deadline, f"{name} never reached {value}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.25)

    def stop(self) -> bool:
        """SIGTERM; whether the server shut down gracefully (uvicorn re-raises the signal once it has)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log.read_text()


@pytest.fixture
def served(store, tmp_path):
    """``served(*args)``: a server over ``store`` with alice's token; stopped at the end."""
    token = TokenStore(store).create("user:alice")[0]
    servers = []

    def start(*args: str) -> tuple[Server, str]:
        servers.append(Server(store.root, tmp_path / f"serve-{len(servers)}.log", *args))
        return servers[-1], token

    yield start
    for server in servers:
        server.stop()


def test_chats_are_learned_while_serving_and_the_next_answer_comes_from_the_new_version(store, served):
    server, token = served("--auto-update", "pending>=4", "--auto-update-interval", "0.2", "--auto-update-args", TRAIN)
    assert server.metric(token, "persona_pending_rows") == 0
    for _ in range(4):
        assert server.chat(token).headers["x-persona-model"] == "user:alice@v1"
    server.wait_metric(token, 'persona_auto_update_runs_total{result="ok"}', 1)
    assert server.metric(token, 'persona_auto_updates_total{result="promoted"}') == 1
    assert server.metric(token, 'persona_auto_updates_total{result="rejected"}') == 0
    assert server.metric(token, 'persona_auto_update_runs_total{result="failed"}') == 0
    assert server.metric(token, "persona_auto_update_last_run_duration_seconds") > 0
    # Served without a restart: the engine pins `current` from refs.json at each request.
    assert server.chat(token).headers["x-persona-model"] == "user:alice@v2"
    info = store.show("user:alice")
    assert info.current == 2 and info.versions[-1].origin == "auto-update" and info.versions[0].origin is None
    assert info.versions[-1].pending["rows"] == 4  # trained on the 4 logged chats, which left the queue
    assert info.pending == 1  # the chat just answered by v2, logged for the next run
    assert re.search(r"v0002 \[current\] parent=v1 .*from auto-update", cli("show", "user:alice"))
    assert "auto-update: worker pid" in server.log.read_text()


def test_a_failing_adapter_leaves_serving_answering_and_is_counted_and_quarantined(store, served):
    damage_queue(store, "user:bob")  # so `persona update --all` fails on bob, every time
    server, token = served("--auto-update", "pending>=2", "--auto-update-interval", "0.2", "--auto-update-args", TRAIN)
    server.wait_metric(token, "persona_auto_update_quarantined_adapters", 1)
    assert server.metric(token, 'persona_auto_updates_total{result="failed"}') == 1
    assert server.metric(token, 'persona_auto_update_runs_total{result="ok"}') == 1  # one adapter's failure only
    assert server.metric(token, 'persona_auto_update_runs_total{result="failed"}') == 0
    assert server.chat(token).headers["x-persona-model"] == "user:alice@v1"  # serving goes on
    assert server.metric(token, "persona_auto_update_running") == 0
    assert server.metric(token, "persona_pending_rows") >= 2
    log = server.log.read_text()
    assert "auto-update: quarantined user:bob" in log and "user/bob/pending.jsonl" in log  # the reason, naming the file
    assert store.version_numbers("user:bob") == [1] and store.verify().ok  # nothing published, nothing damaged
    assert server.stop()
    assert server.log.read_text().count("quarantined user:bob") == 1  # bob's 2 rows did not start more runs


def training_worker(store: Store, server: Server, token: str) -> int:
    """Wait until the worker is inside alice's update (it holds her update lock); its pid."""
    server.wait_metric(token, "persona_auto_update_running", 1)
    probe = Store(store.root, lock_timeout=0.2)
    deadline = time.time() + WAIT
    while True:
        try:
            with probe.lock(AdapterRef("user", "alice"), purpose="update"):
                pass
        except LockTimeout:
            break
        running = server.metric(token, "persona_auto_update_running")
        assert time.time() < deadline and running == 1, server.log.read_text()[-3000:]
        time.sleep(0.1)
    return int(re.search(r"worker pid (\d+) started", server.log.read_text()).group(1))


LONG_TRAINING = "--epochs 1000 --batch-size 1 --min-pending 1"  # 1000 steps: long enough to be caught training


def test_a_killed_worker_leaves_serving_answering_and_each_adapter_untouched(store, served):
    server, token = served("--auto-update", "pending>=1", "--auto-update-interval", "0.2",
                           "--auto-update-args", LONG_TRAINING)
    server.chat(token)
    os.kill(training_worker(store, server, token), signal.SIGKILL)  # as the out-of-memory killer would
    server.wait_metric(token, 'persona_auto_update_runs_total{result="failed"}', 1)
    assert server.chat(token).headers["x-persona-model"] == "user:alice@v1"
    info = store.show("user:alice")
    assert store.version_numbers("user:alice") == [1] and info.current == 1 and store.verify().ok
    assert info.pending == 2  # the chat it was training on is still queued, and the one after it
    assert "run failed (exit -9)" in server.log.read_text()
    assert server.stop()


def test_shutdown_stops_a_training_worker_and_leaves_the_adapter_untouched(store, served):
    server, token = served("--auto-update", "pending>=1", "--auto-update-interval", "0.2",
                           "--auto-update-args", LONG_TRAINING)
    server.chat(token)
    pid = training_worker(store, server, token)
    assert server.stop()
    log = server.log.read_text()
    assert "stopping the worker" in log and "stopped with the server" in log
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, not orphaned
    info = store.show("user:alice")
    assert store.version_numbers("user:alice") == [1] and info.current == 1  # untouched: nothing published
    assert info.pending == 1 and store.verify().ok  # and its chat still waits for the next run
