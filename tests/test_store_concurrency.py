"""Concurrent writers and readers of one adapter.

Several processes (``tests/_publisher.py ... burst``) publish versions of the same adapter at once,
released together once all have started; the store's per-adapter lock must give them unique,
increasing numbers with none lost. Meanwhile this process loads ``current`` in a loop: since nothing
a reader can see is modified in place, it must never see an error or a torn version.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from persona.store import Store

REF = "user:alice"
PUBLISHER = Path(__file__).with_name("_publisher.py")
WRITERS = 4
PER_WRITER = 5
TIMEOUT_S = 120.0


def _read_line(proc: subprocess.Popen, deadline: float) -> str:
    fd = proc.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, "a publisher did not answer in time"
        byte = os.read(fd, 1)
        assert byte, f"a publisher exited early (code {proc.wait()}); see its stderr above"
        line += byte
    return line.decode().strip()


def test_concurrent_publishers_get_unique_increasing_versions_and_readers_never_see_a_torn_one(
    isolated_store, tiny_base
):
    store = Store.init(isolated_store, base=tiny_base)
    store.create(REF)
    deadline = time.monotonic() + TIMEOUT_S
    procs = [
        subprocess.Popen(
            [sys.executable, str(PUBLISHER), str(store.root), REF, "burst", str(PER_WRITER), str(i)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
        )
        for i in range(WRITERS)
    ]
    try:
        for p in procs:
            assert _read_line(p, deadline) == "ready"
        for p in procs:  # released together: they contend for the lock from the first publish on
            p.stdin.write(b"go\n")
            p.stdin.close()

        # The reader: resolve and load `current` while the writers publish.
        loads, seen, last = 0, set(), 0
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the publishers did not finish in time"
            adapter = store.load(REF)  # raises on a missing file, a hash mismatch, a missing version
            version = adapter.info.version
            # Numbers are allocated and `current` moved under one lock: `current` only moves forward.
            assert version >= last, (version, last)
            if version > 1:
                metrics = adapter.info.metrics
                assert adapter.tensors["marker"].tolist() == [metrics["seed"], metrics["seq"]]
            last = version
            loads += 1
            seen.add(version)

        results = [json.loads(_read_line(p, deadline)) for p in procs]
        assert [p.wait() for p in procs] == [0] * WRITERS
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    print(f"\nversions per writer: {[r['versions'] for r in results]}; reader: {loads} loads, {len(seen)} distinct")
    # The reader really overlapped the writers.
    assert loads >= 5 and len(seen) >= 2, (loads, sorted(seen))

    owner: dict[int, tuple[int, int]] = {}
    for result in results:
        mine = result["versions"]
        assert len(mine) == PER_WRITER
        assert mine == sorted(mine) and len(set(mine)) == PER_WRITER, mine  # each writer's own: increasing
        for seq, version in enumerate(mine, start=1):
            assert version not in owner, f"v{version} was returned to two writers"
            owner[version] = (result["id"], seq)
    last_version = 1 + WRITERS * PER_WRITER
    assert sorted(owner) == list(range(2, last_version + 1))

    # None lost: every returned version exists, verifies, and holds what its writer published.
    assert store.version_numbers(REF) == list(range(1, last_version + 1))
    report = store.verify()
    assert report.ok, [str(p) for p in report.problems]
    for result in results:
        parent = None
        for version in result["versions"]:
            adapter = store.load(f"{REF}@v{version}")
            assert adapter.tensors["marker"].tolist() == list(owner[version])
            assert adapter.info.parent == parent
            parent = version
    # The last writer to take the lock published the highest number and moved `current` last.
    assert store.aliases(REF) == {"current": last_version}
    assert not [p.name for p in store._adapter_dir(REF).iterdir() if p.name.startswith(".tmp-")]
