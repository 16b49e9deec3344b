"""A publisher process for the crash and concurrency tests of the store (not a test module).

Usage::

    python tests/_publisher.py ROOT REF serve          # a fork server, driven over stdin/stdout
    python tests/_publisher.py ROOT REF burst N ID     # publish N versions of REF after "go"

Both modes load ``REF@v1`` once (its adapter_config, and its tensors as a template) and, but for
``create``, never import transformers; importing torch costs a second or two, which is why the crash tests do not
start a fresh interpreter for every kill.

``serve`` reads one command a line and answers one line:

- ``publish`` -> ``pid PID`` (once the worker runs): fork a worker that publishes versions of REF in a loop until it is
  killed. Each publish moves ``current``; every third one also moves ``candidate``. The tensors are
  about 2 MB, so a publish lasts milliseconds and a SIGKILL at a random moment lands inside one.
  Each version carries a ``marker`` tensor [worker seed, sequence] equal to its ``metrics``.
- ``create PREFIX`` -> ``pid PID``: fork a worker that creates fresh adapters
  ``user:PREFIX-0``, ``user:PREFIX-1``, ... in a loop until it is killed. Their weights are REF's LoRA
  factors only, the sequence number in the first A's [0, 0] (:func:`create_marked`); give REF a
  high rank for a create that lasts. The server then imports transformers once (create's base check).
- ``wait PID`` -> ``dead PID STATUS``: reap a worker (so it is gone before the store is checked).
- ``exit`` (or end of input): kill the remaining workers and exit.

A worker exits by itself when the server is gone or after ``WORKER_DEADLINE_S``, so a test that
dies never leaves a publisher running.

``burst`` prints ``ready``, waits for a ``go`` line, publishes N versions (parent = its own previous
version, a short random pause before each) and prints one JSON line ``{"id": ID, "versions": [...]}``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from persona.store import NewVersion, Store  # noqa: E402

WORKER_DEADLINE_S = 30.0
FILLER_ELEMENTS = 512 * 1024  # float32: 2 MiB


def template(store: Store, ref: str) -> tuple[dict, dict]:
    """(tensors, adapter_config) of ``ref@v1``, the tensors perturbed and padded to about 2 MB."""
    loaded = store.load(f"{ref}@v1")
    gen = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in loaded.tensors.items()}
    tensors["filler"] = torch.randn(FILLER_ELEMENTS, generator=gen)
    return tensors, dict(loaded.config)


def with_marker(tensors: dict, a: int, b: int) -> dict:
    out = dict(tensors)
    out["marker"] = torch.tensor([a, b], dtype=torch.int64)
    out["filler"] = tensors["filler"].clone()
    out["filler"][:64] = float(b)  # every version's weights differ from the last one's
    return out


def _alive(server: int, started: float) -> bool:
    return os.getppid() == server and time.monotonic() - started < WORKER_DEADLINE_S


def publish_forever(store: Store, ref: str, tensors: dict, config: dict, seed: int, server: int) -> None:
    started = time.monotonic()
    parent = store.aliases(ref).get("current")
    seq = 0
    while _alive(server, started):
        seq += 1
        info = store.publish_version(
            ref, NewVersion(with_marker(tensors, seed, seq), config, parent=parent, metrics={"seed": seed, "seq": seq}),
            set_alias="current")
        if seq % 3 == 0:
            store.set_alias(ref, "candidate", info.version)
        parent = info.version


def create_marked(tensors: dict, i: int) -> dict:
    """What a create publishes: the LoRA factors only (create checks given weights against the base,
    issue 13, so no ``marker`` or ``filler`` key), with ``i`` in the first A factor's [0, 0]."""
    out = {k: v.clone() for k, v in tensors.items() if k.endswith(".weight")}
    out[min(k for k in out if k.endswith("lora_A.weight"))][0, 0] = float(i)
    return out


def create_marker(tensors: dict) -> int:
    """The ``i`` of :func:`create_marked`."""
    return int(tensors[min(k for k in tensors if k.endswith("lora_A.weight"))][0, 0])


def create_forever(store: Store, prefix: str, tensors: dict, config: dict, server: int) -> None:
    started = time.monotonic()
    i = 0
    while _alive(server, started):
        store.create(f"user:{prefix}-{i}", tensors=create_marked(tensors, i), adapter_config=config)
        i += 1


def serve(store: Store, ref: str) -> None:
    tensors, config = template(store, ref)
    server = os.getpid()
    workers: set[int] = set()
    seed = 0
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd in ("publish", "create"):
                if cmd == "create":  # create's shape check reads the base's config: once, here, not per worker
                    store._base_linear_shapes  # noqa: B018
                seed += 1
                sys.stdout.flush()
                started_r, started_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker: never returns into the server loop
                    code = 0
                    try:
                        os.close(started_r)
                        os.write(started_w, b"1")  # running: the test's random delay starts now
                        os.close(started_w)
                        if cmd == "publish":
                            publish_forever(store, ref, tensors, config, seed, server)
                        else:
                            create_forever(store, args[0], tensors, config, server)
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                        code = 1
                    finally:
                        os._exit(code)
                workers.add(pid)
                os.close(started_w)
                os.read(started_r, 1)
                os.close(started_r)
                print(f"pid {pid}", flush=True)
            elif cmd == "wait":
                pid = int(args[0])
                _, status = os.waitpid(pid, 0)
                workers.discard(pid)
                print(f"dead {pid} {status}", flush=True)
            elif cmd == "exit":
                break
            else:
                print(f"error unknown command {cmd!r}", flush=True)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def burst(store: Store, ref: str, n: int, ident: int) -> None:
    tensors, config = template(store, ref)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    versions: list[int] = []
    rng = random.Random(ident)
    for seq in range(1, n + 1):
        # A pause outside the lock between publishes: filelock's waiters poll (every 50 ms), so
        # without it one writer re-takes the lock for all its publishes and they never interleave.
        time.sleep(rng.uniform(0.0, 0.06))
        info = store.publish_version(ref, NewVersion(
            with_marker(tensors, ident, seq), config, parent=versions[-1] if versions else None,
            metrics={"seed": ident, "seq": seq}), set_alias="current")
        versions.append(info.version)
    print(json.dumps({"id": ident, "versions": versions}), flush=True)


def main(argv: list[str]) -> None:
    root, ref, mode, *rest = argv
    torch.set_num_threads(1)  # no OpenMP pool in the server: its forked workers stay safe
    store = Store.open(root)
    store.lock_timeout = 60.0
    if mode == "serve":
        serve(store, ref)
    elif mode == "burst":
        burst(store, ref, int(rest[0]), int(rest[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
