"""Shared fixtures.

- Every test gets its own store root (``$PERSONA_HOME``) under tmp_path; nothing touches a real home.
- The cache (``$PERSONA_CACHE``, where the embedded base is converted once) is one temp dir per
  session, or ``$PERSONA_TEST_CACHE`` when set, to skip the 20 s GGUF conversion between runs.
- ``tiny_base`` is a small random Llama built from a config, saved with the real tokenizer, so
  store, training and engine tests run in seconds. A handful of tests use the real embedded base.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SESSION_CACHE = os.environ.get("PERSONA_TEST_CACHE") or tempfile.mkdtemp(prefix="persona-test-cache-")
os.environ["PERSONA_CACHE"] = _SESSION_CACHE

EMBEDDED = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch) -> Path:
    """Point the default store at a fresh temp dir for every test."""
    root = tmp_path / "adapters"
    monkeypatch.setenv("PERSONA_HOME", str(root))
    monkeypatch.setenv("PERSONA_CACHE", _SESSION_CACHE)
    return root


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (from the embedded base)."""
    from persona.base import load_tokenizer

    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_base(tokenizer) -> str:
    """Path of a tiny random Llama (2 layers, hidden 64) with the real tokenizer, seeded."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(_SESSION_CACHE) / "tiny-llama"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    return str(path)


PLANTED = "<script>alert('planted')</script><img src=\"http://planted.example/x.png\">"


@pytest.fixture(scope="session")
def report_store(tiny_base, tmp_path_factory):
    """A store on the tiny base with every kind of history a report shows; read-only (copy it to change it).

    - ``user:alice``: created, two real updates (kept held-out slices), then a candidate the gate refused,
      whose recorded reason is :data:`PLANTED` markup (it must reach HTML escaped);
    - ``domain:finance`` (random init) and ``user:bob`` layered over it (``create --over``), with one
      hand-made update keeping a slice, whose lineage names the layer with a planted relation;
    - ``merged:af``: a cat merge of alice and finance.

    Returns ``SimpleNamespace(root=Path, planted=str)``.
    """
    from types import SimpleNamespace

    import torch

    from persona import LoraSettings, Store
    from persona.compose.merge import merge
    from persona.interactions import read_interactions
    from persona.store import NewVersion
    from persona.training.trainer import Trainer, UpdateConfig

    examples = Path(__file__).resolve().parent.parent / "examples" / "interactions"
    root = tmp_path_factory.mktemp("report") / "adapters"
    store = Store.init(root, base=tiny_base)
    store.create("user:alice", LoraSettings(rank=2, seed=1))
    store.create("domain:finance", LoraSettings(rank=2, init="random", seed=2))
    store.create("user:bob", LoraSettings(rank=2, seed=3), over="domain:finance")
    trainer = Trainer(store)
    config = UpdateConfig(epochs=1, batch_size=8, max_length=96)
    trainer.update("user:alice", read_interactions(examples / "alice.jsonl")[:12], config)
    trainer.update("user:alice", read_interactions(examples / "alice-2.jsonl")[:12], config)
    loaded = store.load("user:alice")
    refused = {"heldout_loss_before": 3.0, "heldout_loss_after": 3.1, "replay_loss_before": 1.0,
               "replay_loss_after": 1.5, "forgetting": 0.5, "train_examples": 9, "heldout_examples": 3,
               "gate": {"promoted": False, "reason": PLANTED, "forced": False}}
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=3, metrics=refused),
                          set_alias="candidate")
    bob = store.load("user:bob")
    torch.manual_seed(4)
    tensors = {k: torch.randn_like(v) * 0.3 for k, v in bob.tensors.items()}
    metrics = {"heldout_loss_before": 10.9, "heldout_loss_after": 10.5, "train_examples": 6, "heldout_examples": 3,
               "gate": {"promoted": True, "reason": "held-out loss improved", "forced": False}}
    lineage = ({"adapter": "domain:finance", "version": 1, "relation": PLANTED},)
    store.publish_version("user:bob", NewVersion(tensors, bob.config, parent=1, metrics=metrics, lineage=lineage,
                                                 heldout=read_interactions(examples / "bob.jsonl")[:3]))
    merge(store, ["user:alice", "domain:finance"], "merged:af", "cat", weights=[0.7, 0.5])
    return SimpleNamespace(root=root, planted=PLANTED)


@pytest.fixture
def run_cli(tiny_base, isolated_store):
    """``run_cli(*args, ok=True, input=None)``: invoke the persona CLI in-process on a store bound to the tiny base."""
    from click.testing import CliRunner

    from persona.cli import main

    runner = CliRunner()

    def run(*args, ok=True, input=None):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False, input=input)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    run("init", "--base", tiny_base)
    return run


@contextmanager
def loopback_server(app):
    """Serve a FastAPI ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def server_world(tiny_base, tmp_path_factory, name: str) -> dict:
    """A store with user:alice, user:bob and domain:finance (rank 4, random), tokens "alice", "bob" and
    "admin", an engine over it and `persona serve`'s app (auth and interaction logging on)."""
    from persona import LoraSettings, Store
    from persona.http.app import ServerConfig, create_app
    from persona.serving.engine import Engine
    from persona.store.tokens import TokenStore

    store = Store.init(tmp_path_factory.mktemp(name), base=tiny_base)
    for ref, seed in (("user:alice", 1), ("user:bob", 2), ("domain:finance", 3)):
        store.create(ref, LoraSettings(init="random", seed=seed, rank=4))
    tokens = TokenStore(store)
    secrets = {who: tokens.create(subject)[0] for who, subject in
               (("alice", "user:alice"), ("bob", "user:bob"), ("admin", "admin"))}
    engine = Engine(store, max_resident=4, max_batch=8)
    app = create_app(engine, ServerConfig(auth=True, log_interactions=True))
    return {"app": app, "store": store, "engine": engine, "tokens": secrets}


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    """A module's :func:`server_world` served on loopback: its ``url`` beside the store, engine and tokens."""
    world = server_world(tiny_base, tmp_path_factory, "server-store")
    try:
        with loopback_server(world["app"]) as url:
            yield {"url": url, **world}
    finally:
        world["engine"].close()
