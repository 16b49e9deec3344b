"""Crash consistency of the store: a writer SIGKILLed at any instant leaves the old state or the new.

A publisher process (``tests/_publisher.py ... serve``, which imports torch once and forks one worker
per trial) publishes versions in a tight loop; the test kills the worker with SIGKILL after a random,
seeded delay spread over several publish cycles, so kills land while tensors are written, while
they are hashed and fsynced, between the rename of the version and the rewrite of ``refs.json``, and
while ``candidate`` moves. After every kill the store must hold only whole versions, aliases that
name existing versions, and a ``refs.json`` that parses; and the next publish must succeed.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _publisher import create_marked, create_marker  # tests/ is on sys.path (pytest's rootdir-relative import)
from persona import LoraSettings
from persona.store import NewVersion, Store

REF = "user:alice"
PUBLISHER = Path(__file__).with_name("_publisher.py")
TMP = ".tmp-"
REPLY_TIMEOUT_S = 60.0
PUBLISH_KILLS = 60
CREATE_KILLS = 20
# A publish of the ~2 MB of tensors takes 10-50 ms (mostly writing and fsyncing, so it varies with
# the disk's load). The kill delays are drawn over a few publish cycles, measured first, so that the
# kill's phase within a cycle is spread over all of it, on a fast disk or a slow one.
CALIBRATE_S = 0.3
CYCLES_PER_DELAY = 3


class PublisherServer:
    """The ``serve`` mode of tests/_publisher.py, driven line by line."""

    def __init__(self, root: Path, ref: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(PUBLISHER), str(root), ref, "serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        self._buf = b""
        assert self._reply() == "ready"

    def _reply(self) -> str:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"the publisher server did not answer within {REPLY_TIMEOUT_S:.0f}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"the publisher server exited (code {self.proc.wait()}); see its stderr above")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def command(self, line: str) -> str:
        self.proc.stdin.write(line.encode() + b"\n")
        return self._reply()

    def start(self, what: str) -> int:
        reply = self.command(what)
        assert reply.startswith("pid "), reply
        return int(reply.split()[1])

    def kill(self, pid: int) -> None:
        """SIGKILL a worker and reap it; fail if it had died on its own (a publish raised)."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reply = self.command(f"wait {pid}")
        status = int(reply.split()[2])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the worker was not killed but exited by itself (status {status}): a store call raised; see stderr"
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"exit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def store(isolated_store, tiny_base) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.lock_timeout = 10.0  # a lock a killed writer failed to release would fail fast, not hang
    return store


@pytest.fixture
def server_factory():
    servers: list[PublisherServer] = []

    def start(root: Path, ref: str) -> PublisherServer:
        servers.append(PublisherServer(root, ref))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _template(store: Store, ref: str) -> tuple[dict, dict]:
    loaded = store.load(f"{ref}@v1")
    return {k: v + 0.5 for k, v in loaded.tensors.items()}, dict(loaded.config)  # B != 0: non-trivial


def _marked(tensors: dict, a: int, b: int) -> dict:
    import torch

    return {**tensors, "marker": torch.tensor([a, b], dtype=torch.int64)}


def _assert_consistent(store: Store, ref: str, loaded: set[int], v1_keys: set[str]) -> tuple[list[int], dict[str, int]]:
    """Everything a reader can see of ``ref`` is whole. Returns (version numbers, aliases)."""
    folder = store._adapter_dir(ref)
    names = [p.name for p in folder.iterdir()]
    refs = json.loads((folder / "refs.json").read_text())  # parses: never torn
    aliases = {alias: int(v) for alias, v in refs["aliases"].items()}

    numbers = store.version_numbers(ref)
    on_disk = sorted(int(n[1:]) for n in names if re.fullmatch(r"v[0-9]{4,}", n))
    assert numbers == on_disk
    # Numbers are allocated as max + 1 and a crashed publish never becomes a version: no gaps.
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    listed = [v.label for v in store.versions(ref)]
    assert listed == [f"v{n:04d}" for n in numbers]
    assert not any(label.startswith(TMP) for label in listed)

    for alias, version in aliases.items():
        assert version in numbers, f"alias {alias!r} -> missing v{version:04d} (versions {numbers})"
    assert "current" in aliases
    assert store.aliases(ref) == aliases

    report = store.verify()
    assert report.ok, [str(p) for p in report.problems]
    assert report.versions == len(numbers)
    assert [a.adapter for a in store.list()] == [ref]

    for n in numbers:
        if n in loaded:
            continue  # versions are immutable and verify() above re-hashed every file of every one
        adapter = store.load(f"{ref}@v{n}")
        assert adapter.info.version == n
        if n > 1:
            assert set(adapter.tensors) - {"filler"} == v1_keys | {"marker"}  # workers pad with "filler"
            # the weights and the meta.json of one version come from the same publish
            assert adapter.tensors["marker"].tolist() == [adapter.info.metrics["seed"], adapter.info.metrics["seq"]]
        loaded.add(n)
    assert store.load(ref).info.version == aliases["current"]
    return numbers, aliases


def test_sigkill_during_publish_leaves_only_whole_versions_and_valid_aliases(store, server_factory):
    store.create(REF)
    v1_keys = set(store.load(REF).tensors)
    tensors, config = _template(store, REF)
    folder = store._adapter_dir(REF)
    server = server_factory(store.root, REF)
    rng = random.Random(20240607)
    loaded: set[int] = set()
    seen = Counter()
    last_current = 1
    refs_temps: set[str] = set()  # see test_publish_clears_a_stale_refs_temp_file_of_a_crashed_writer

    pid = server.start("publish")
    time.sleep(CALIBRATE_S)
    server.kill(pid)
    cycle = CALIBRATE_S / max(len(store.version_numbers(REF)) - 1, 1)
    max_delay = min(max(CYCLES_PER_DELAY * cycle, 0.02), 0.3)
    _assert_consistent(store, REF, loaded, v1_keys)
    last_current = store.aliases(REF)["current"]

    for trial in range(PUBLISH_KILLS):
        pid = server.start("publish")
        time.sleep(rng.uniform(0.0, max_delay))
        server.kill(pid)

        leftovers = [p for p in folder.iterdir() if p.name.startswith(TMP)]
        seen["mid_version_write"] += any(p.is_dir() for p in leftovers)
        new_refs_temps = {p.name for p in leftovers if p.name.startswith(f"{TMP}refs.json")} - refs_temps
        seen["mid_refs_write"] += bool(new_refs_temps)
        refs_temps |= new_refs_temps

        numbers, aliases = _assert_consistent(store, REF, loaded, v1_keys)
        # Every publish renames its version in, then moves current: current is the newest version, or
        # the one before when the kill fell between the rename and the rewrite of refs.json.
        assert aliases["current"] >= max(last_current, numbers[-1] - 1), (aliases, numbers, last_current)
        seen["alias_lagging"] += aliases["current"] == numbers[-1] - 1
        seen["published_by_workers"] += numbers[-1] - last_current

        # The next publish succeeds, takes the next number, and clears the crashed writer's temp dirs.
        info = store.publish_version(REF, NewVersion(
            _marked(tensors, -1, trial), config, parent=aliases["current"], metrics={"seed": -1, "seq": trial}),
            set_alias="current")
        assert info.version == numbers[-1] + 1
        assert store.aliases(REF)["current"] == info.version
        stale_dirs = [p.name for p in folder.iterdir() if p.name.startswith(TMP) and p.is_dir()]
        assert stale_dirs == []
        last_current = info.version

    _assert_consistent(store, REF, loaded, v1_keys)
    print(
        f"\npublish kills: {PUBLISH_KILLS}, cycle {cycle * 1000:.0f} ms, {dict(seen)}, "
        f"refs temp files left: {len(refs_temps & set(os.listdir(folder)))}"
    )
    # The kills did land inside publishes (not only between them): some left a half-written version,
    # and the workers did publish between kills (so kills also hit the later steps of a publish).
    assert seen["mid_version_write"] >= 5, seen
    assert seen["published_by_workers"] >= 10, seen


def test_sigkill_during_create_leaves_no_adapter_or_a_complete_one(store, server_factory):
    # rank 256 on the tiny base: about 2 MB of factors, so a create lasts (a create takes LoRA factors only)
    store.create("user:seed", LoraSettings(rank=256))
    tensors, config = _template(store, "user:seed")
    kind_dir = store.root / "user"
    server = server_factory(store.root, "user:seed")
    rng = random.Random(99)
    complete = {"user:seed"}
    seen = Counter()

    for trial in range(CREATE_KILLS):
        prefix = f"c{trial}"
        pid = server.start(f"create {prefix}")
        time.sleep(rng.uniform(0.0, 0.1))
        server.kill(pid)

        seen["mid_create"] += any(p.name.startswith(f"{TMP}{prefix}-") for p in kind_dir.iterdir())
        # The worker creates prefix-0, prefix-1, ... in order: those before the first missing one exist
        # whole; the one it was killed in is absent (not half there); none after it exists.
        made = 0
        while (kind_dir / f"{prefix}-{made}").exists():
            ref = f"user:{prefix}-{made}"
            assert store.version_numbers(ref) == [1]
            assert store.aliases(ref) == {"current": 1}
            assert store.verify(ref).ok
            assert create_marker(store.load(ref).tensors) == made
            complete.add(ref)
            made += 1
        killed_in = f"user:{prefix}-{made}"
        assert not store.exists(killed_in)
        visible = {p.name for p in kind_dir.iterdir() if not p.name.startswith(TMP)}
        assert visible == {r.split(":", 1)[1] for r in complete}
        assert sorted(a.adapter for a in store.list()) == sorted(complete)
        assert store.verify().ok

        # A crashed create never blocks creating that adapter again.
        store.create(killed_in, tensors=create_marked(tensors, made), adapter_config=config)
        assert store.version_numbers(killed_in) == [1]
        assert create_marker(store.load(killed_in).tensors) == made
        complete.add(killed_in)

    print(f"\ncreate kills: {CREATE_KILLS}, {dict(seen)}")
    assert seen["mid_create"] >= 2, seen


def test_publish_clears_a_stale_version_temp_dir_of_a_crashed_writer(store):
    store.create(REF)
    folder = store._adapter_dir(REF)
    stale = folder / f"{TMP}v0002-0123456789ab"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half a file")
    assert store.version_numbers(REF) == [1]

    loaded = store.load(REF)
    info = store.publish_version(REF, NewVersion(loaded.tensors, loaded.config, parent=1))

    assert info.version == 2
    assert not stale.exists()
    assert store.verify().ok


def test_publish_clears_a_stale_refs_temp_file_of_a_crashed_writer(store):
    """Regression: stale temps were removed with rmtree(ignore_errors=True), which left files behind."""
    store.create(REF)
    folder = store._adapter_dir(REF)
    stale = folder / f"{TMP}refs.json-0123456789ab"
    stale.write_bytes(b'{"aliases": {"curr')  # what a kill inside atomic_write_json leaves

    loaded = store.load(REF)
    store.publish_version(REF, NewVersion(loaded.tensors, loaded.config, parent=1))

    assert store.aliases(REF) == {"current": 2}
    assert not stale.exists()


def test_create_clears_its_own_stale_staging_but_not_a_neighbours(store):
    kind_dir = store.root / "user"
    kind_dir.mkdir(parents=True, exist_ok=True)
    own = kind_dir / f"{TMP}ann-0123456789ab"
    neighbour = kind_dir / f"{TMP}ann-b-0123456789ab"  # staging of user:ann-b, a different adapter
    own.mkdir()
    neighbour.mkdir()
    store.create("user:ann")
    assert not own.exists() and neighbour.exists()
