"""Build ``tests/data/store-v1``: a small store written by the store code of its time (issue 12).

The committed store pins the on-disk format: ``tests/test_store_format.py`` opens it with the
current code and checks that listing, resolving, loading, verifying, the replay buffer, the pending
queue and the API tokens read back what this script wrote (recorded in ``expected.json``).

Run from the repository root, with the embedded base's tokenizer in ``$PERSONA_CACHE``::

    PYTHONPATH=$PWD python tests/data/make_store_fixture.py

It overwrites ``tests/data/store-v1``. Rerun it only to pin a NEW format: the point of the committed
copy is that it was written before the code that now reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
OUT = HERE / "store-v1"
EXAMPLES = HERE.parent.parent / "examples" / "interactions"


def tiny_base(folder: Path) -> str:
    """A 2-layer, hidden-64 random Llama with the real tokenizer, seeded (as ``tiny_base`` in conftest)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from persona.base import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = folder / "tiny-llama"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _fisher(store):
    """The EWC Fisher of user:alice@v2 (its side file was named ``fisher.safetensors`` before issue 13)."""
    try:
        return store.load_extra("user:alice@v2", "fisher")
    except Exception:  # pragma: no cover - the store code of before issue 13 took the file name
        return store.load_extra("user:alice@v2", "fisher.safetensors")


def main() -> None:
    from persona import LoraSettings, Store
    from persona.compose.merge import merge
    from persona.interactions import read_interactions

    try:  # the token store moved with issue 12; the script keeps working on both sides of it
        from persona.store.tokens import TokenStore
    except ImportError:  # pragma: no cover
        from persona.auth import TokenStore
    from persona.training.trainer import Trainer, UpdateConfig, log_interactions

    work = Path(tempfile.mkdtemp(prefix="persona-fixture-"))
    try:
        base = tiny_base(work)
        if OUT.exists():
            shutil.rmtree(OUT)
        store = Store.init(OUT, base=base)
        small = LoraSettings(rank=2, alpha=4, seed=1)
        store.create("domain:finance", small)
        store.create("user:alice", small)
        store.create("user:bob", small, over="domain:finance")
        alice = read_interactions(EXAMPLES / "alice.jsonl")[:12]
        # ewc stores a Fisher estimate beside v2: an extra file the format must keep reading.
        Trainer(store).update("user:alice", alice, UpdateConfig(epochs=1, batch_size=4, max_length=48, seed=0, reg="ewc",
                                                                force=True))
        store.set_alias("user:alice", "stable", 1)
        pending = read_interactions(EXAMPLES / "alice-2.jsonl")[:3]
        log_interactions(store, "user:alice", pending)
        merge(store, ["domain:finance", "user:alice"], "merged:team", "linear", weights=[0.5, 0.5])
        secret, token = TokenStore(store).create("user:alice")

        expected = {
            "adapters": [a.to_dict() for a in store.list()],
            "resolve": {r: str(store.resolve(r)) for r in ("user:alice", "user:alice@stable", "user:bob",
                                                             "domain:finance", "merged:team")},
            "weights": {r: {k: [list(t.shape), float(t.double().sum())] for k, t in store.load(r).tensors.items()}
                        for r in ("user:alice@v1", "user:alice@v2", "user:bob", "domain:finance", "merged:team")},
            "fisher_keys": sorted(_fisher(store) or {}),
            "verify": store.verify().to_dict(),
            "replay": [json.loads(line) for line in (OUT / "user" / "alice" / "replay.jsonl").read_text().splitlines()],
            "pending": [i.to_json() for i in pending],
            "token": {"secret": secret, **token.to_dict()},
        }
        (HERE / "store-v1.expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(OUT / ".locks", ignore_errors=True)  # lock files are empty and recreated on demand
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
