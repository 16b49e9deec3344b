"""A user adapter's retrieval memory (issue 16): the store's entries file and index, forgetting,
deletion, crash safety, the version's record, the engine's prompt, the HTTP API and the CLI."""

import json
import os
import stat

import httpx
import pytest

from persona import DamagedAdapter, InvalidConfig, InvalidReference, LoraSettings, Store
from persona.interactions import Interaction
from persona.store import memory as memory_store
from persona.store.memory import MEMORY, entry_text

CAT = Interaction(messages=(("user", "My cat is called Tom."), ("assistant", "Noted.")))
CITY = Interaction(prompt="Where do I live?", completion="You live in Lisbon.")
JOB = Interaction(text="I work as a nurse at the city hospital.")
CAT_QUESTION = "What is my cat's name?"


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    for name, seed in (("alice", 1), ("bob", 2)):
        store.create(f"user:{name}", LoraSettings(init="random", rank=4, seed=seed))
    store.create("domain:finance", LoraSettings(init="random", rank=4, seed=3))
    return store


def folder(store, ref="user:alice"):
    return store.root / ref.split(":")[0] / ref.split(":")[1]


# ------------------------------------------------------------------------------------------ the store
def test_logged_interaction_is_searchable_at_once(store):
    store.log("user:alice", [CAT, CITY, JOB])
    memory = store.memory("user:alice")
    assert [e.text for e in memory.entries()] == [entry_text(CAT), entry_text(CITY), entry_text(JOB)]
    hits = memory.search(CAT_QUESTION, k=2)
    assert hits[0].entry.text == "User: My cat is called Tom.\nAssistant: Noted."
    assert all(h.score > 0 for h in hits) and len(hits) == 1  # only entries sharing a word come back
    assert memory.search("Where do I live now?", k=3)[0].entry.text.endswith("You live in Lisbon.")
    assert store.memory("user:bob").entries() == []  # another user's memory is its own


def test_memory_file_is_private_and_lives_in_the_adapter_folder(store):
    store.log("user:alice", [CAT])
    path = folder(store) / MEMORY
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.verify("user:alice").ok


def test_domain_adapter_keeps_no_memory_but_can_forget(store):
    store.log("domain:finance", [CITY])
    assert not (folder(store, "domain:finance") / MEMORY).exists()
    with pytest.raises(InvalidReference, match="only user adapters keep one"):
        store.memory("domain:finance").entries()
    report = store.memory("domain:finance").forget(match="lisbon")
    assert report.to_dict() == {"memory": 0, "pending": 1, "replay": 0}
    assert store.show("domain:finance").pending == 0


def test_forget_match_removes_from_memory_pending_and_replay(store):
    from persona.store.queues import ReplayBuffer

    store.log("user:alice", [CAT, CITY])
    store.write_replay("user:alice", ReplayBuffer((CITY, JOB), 2))
    report = store.memory("user:alice").forget(match="LISBON")
    assert report.to_dict() == {"memory": 1, "pending": 1, "replay": 1}
    assert [e.text for e in store.memory("user:alice").entries()] == [entry_text(CAT)]
    assert store.take_pending("user:alice").interactions == (CAT,)
    kept = store.replay("user:alice")
    assert kept.items == (JOB,) and kept.seen == 2
    assert store.memory("user:alice").search("Which city do I live in?", k=4) == []
    for name in (MEMORY, "pending.jsonl", "replay.jsonl"):
        assert stat.S_IMODE(os.stat(folder(store) / name).st_mode) == 0o600


def test_forget_match_on_entry_labels_or_system_turn_removes_the_row_everywhere(store):
    # the entry reads "User: ...\nAssistant: ..." and leaves system turns out, the rows do the
    # opposite: a match on either text used to forget from one place and leave the other to be trained
    from persona.store.queues import ReplayBuffer

    SYS = Interaction(messages=(("system", "Codeword zebra."), ("user", "Hi."), ("assistant", "Hello.")))
    store.log("user:alice", [CAT, SYS])
    store.write_replay("user:alice", ReplayBuffer((CAT,), 1))
    report = store.memory("user:alice").forget(match="tom.\nassistant:")
    assert report.to_dict() == {"memory": 1, "pending": 1, "replay": 1}
    report = store.memory("user:alice").forget(match="zebra")
    assert report.to_dict() == {"memory": 1, "pending": 1, "replay": 0}
    assert store.memory("user:alice").entries() == []
    assert store.take_pending("user:alice").interactions == ()
    assert store.replay("user:alice").items == ()


def test_forget_emptying_the_replay_buffer_leaves_it_readable(store):
    # forget used to write an empty replay.jsonl, which then failed to read ("the file is empty"),
    # so the adapter's next update and `persona show` broke
    from persona.store.queues import ReplayBuffer

    store.write_replay("user:alice", ReplayBuffer((CITY,), 3))
    assert store.memory("user:alice").forget(match="lisbon").replay == 1
    emptied = store.replay("user:alice")
    assert emptied.items == () and emptied.seen == 3
    assert store.show("user:alice").replay == 0 and store.verify("user:alice").ok


def test_forget_during_an_update_is_not_undone_by_its_replay_write(store):
    # an update holds the update lock from reading the replay buffer to writing it back with its batch
    # offered in; a forget in between used to be overwritten, so the forgotten rows were replayed again
    import threading
    import time

    from persona.store.queues import ReplayBuffer

    store.write_replay("user:alice", ReplayBuffer((CAT,), 1))
    started = threading.Event()

    def update():
        with store.lock("user:alice", purpose="update"):
            read_at_start = store.replay("user:alice")
            started.set()
            time.sleep(0.5)
            store.write_replay("user:alice", read_at_start.offer([CITY], 10, 0))

    worker = threading.Thread(target=update)
    worker.start()
    started.wait(5)
    report = store.memory("user:alice").forget(match="Tom")
    worker.join()
    assert report.replay == 1
    assert store.replay("user:alice").items == (CITY,)


def test_forget_id_removes_that_interaction_everywhere(store):
    from persona.store.queues import ReplayBuffer

    store.log("user:alice", [CAT, CITY])
    store.write_replay("user:alice", ReplayBuffer((CAT,), 1))
    cat_id = store.memory("user:alice").entries()[0].id
    report = store.memory("user:alice").forget(entry_id=cat_id)
    assert report.to_dict() == {"memory": 1, "pending": 1, "replay": 1}
    assert store.take_pending("user:alice").interactions == (CITY,)
    with pytest.raises(InvalidReference, match="not a memory id"):
        store.memory("user:alice").forget(entry_id="../x")
    with pytest.raises(InvalidConfig, match="exactly one"):
        store.memory("user:alice").forget()


def test_delete_adapter_deletes_its_memory(store):
    store.log("user:alice", [CAT])
    store.delete("user:alice")
    assert not folder(store).exists()
    store.create("user:alice", LoraSettings(rank=4))
    assert store.memory("user:alice").entries() == []
    assert store.memory("user:alice").search(CAT_QUESTION) == []


def test_torn_append_is_ignored_then_cut_by_the_next_log(store):
    store.log("user:alice", [CAT])
    path = folder(store) / MEMORY
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"id": "m-000000000000", "text": "User: I live in Po')
    assert [e.text for e in store.memory("user:alice").entries()] == [entry_text(CAT)]
    assert store.memory("user:alice").snapshot().entries == 1
    problems = store.verify("user:alice").problems
    assert [p.path for p in problems] == [MEMORY] and "torn" in problems[0].reason
    store.log("user:alice", [CITY])
    assert [e.text for e in store.memory("user:alice").entries()] == [entry_text(CAT), entry_text(CITY)]
    assert store.verify("user:alice").ok
    assert path.read_bytes().count(b"\n") == 2


def test_damaged_memory_line_is_skipped_and_reported(store):
    store.log("user:alice", [CAT])
    with open(folder(store) / MEMORY, "ab") as f:
        f.write(b"not json\n")
    store.log("user:alice", [CITY])
    assert len(store.memory("user:alice").entries()) == 2
    problems = store.verify().problems
    assert [(p.adapter, p.path) for p in problems] == [("user:alice", MEMORY)]
    assert "1 unreadable line" in problems[0].reason


def test_stale_index_is_detected_and_rebuilt(store):
    store.log("user:alice", [CAT])
    assert store.memory("user:alice").search("Where do I live?") == []  # index built and cached
    other = Store.open(store.root)  # another writer (a server process) appends: the file grew
    other.log("user:alice", [CITY])
    assert store.memory("user:alice").search("Where do I live?")[0].entry.text.endswith("Lisbon.")
    # a rewrite that is not an append (forget, or a restore from backup) rebuilds from scratch
    other.memory("user:alice").forget(match="Lisbon")
    assert store.memory("user:alice").search("Where do I live?") == []


def test_incremental_index_scores_like_a_full_rebuild(store):
    store.log("user:alice", [CAT, CITY])
    store.memory("user:alice").search(CAT_QUESTION)
    store.log("user:alice", [JOB, Interaction(text="My cat Tom likes the city.")])
    grown = store.memory("user:alice").search("cat city", k=4)
    memory_store._indexes.clear()
    fresh = store.memory("user:alice").search("cat city", k=4)
    assert [(h.entry.id, round(h.score, 5)) for h in grown] == [(h.entry.id, round(h.score, 5)) for h in fresh]


def test_version_records_the_memory_snapshot_it_was_trained_with(store):
    from persona.training.trainer import Trainer, UpdateConfig

    store.log("user:alice", [CAT, CITY, JOB] * 3)
    seen = store.memory("user:alice").snapshot()
    result = Trainer(store).update("user:alice", None, UpdateConfig(epochs=1, batch_size=8, max_length=64))
    assert result.version.memory == {"entries": 9, "digest": seen.digest}
    assert store.version_info(result.version.ref).to_dict()["memory"] == seen.record()
    assert store.version_info("user:bob").memory is None  # created, not trained: no record


def test_meta_with_a_bad_memory_record_is_damaged(store):
    from persona.store.records import parse_meta

    raw = json.loads((folder(store) / "v0001" / "meta.json").read_bytes())
    assert "memory" not in raw  # versions written before issue 16 read as before
    raw["memory"] = {"entries": -1, "digest": "x"}
    with pytest.raises(DamagedAdapter, match="'memory'"):
        parse_meta(json.dumps(raw).encode(), adapter="user:alice", version=1)


# ------------------------------------------------------------------------------------------ the engine
@pytest.fixture
def engine(store):
    from persona.serving.engine import Engine

    from persona.serving.memory import MemoryConfig

    # BM25 alone: these tests pin which entries reach the prompt, and fused retrieval (the default)
    # fills k with the tiny random base's nearest entries whatever the words (tested below)
    engine = Engine(store, max_resident=4, max_batch=4, memory=MemoryConfig(default=False, retrieval="bm25"))
    yield engine
    engine.close()


def greedy(model, content, **kw):
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    messages = kw.pop("messages", None) or ({"role": "user", "content": content},)
    return GenerationRequest(model, messages=messages, params=SamplingParams(max_new_tokens=6, temperature=0), **kw)


def test_engine_puts_memories_in_a_system_message(store, engine):
    from persona.serving.memory import MEMORY_HEADER

    store.log("user:alice", [CAT, CITY])
    cat_id = store.memory("user:alice").entries()[0].id
    with_memory, = engine.generate([greedy("user:alice", CAT_QUESTION, memory=True)])
    block = MEMORY_HEADER + "\n- User: My cat is called Tom. Assistant: Noted."
    explicit, = engine.generate([greedy("user:alice", None, messages=(
        {"role": "system", "content": block}, {"role": "user", "content": CAT_QUESTION}))])
    plain, = engine.generate([greedy("user:alice", CAT_QUESTION)])
    assert with_memory.memories == (cat_id,)
    assert (with_memory.text, with_memory.prompt_tokens) == (explicit.text, explicit.prompt_tokens)
    assert plain.memories == () and plain.prompt_tokens < with_memory.prompt_tokens


def test_memory_joins_an_existing_system_message(store, engine):
    from persona.serving.memory import MEMORY_HEADER

    store.log("user:alice", [CAT])
    ask = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": CAT_QUESTION})
    joined, = engine.generate([greedy("user:alice", None, messages=ask, memory=True)])
    block = "Be brief.\n\n" + MEMORY_HEADER + "\n- User: My cat is called Tom. Assistant: Noted."
    explicit, = engine.generate([greedy("user:alice", None, messages=(
        {"role": "system", "content": block}, ask[1]))])
    assert (joined.text, joined.prompt_tokens) == (explicit.text, explicit.prompt_tokens)


def test_engine_memory_default_and_request_override(store):
    from persona.serving.engine import Engine
    from persona.serving.memory import MemoryConfig
    from persona.serving.requests import GenerationRequest

    store.log("user:alice", [CAT])
    with Engine(store, max_resident=4, memory=MemoryConfig(k=2)) as on:
        assert on.generate([greedy("user:alice", CAT_QUESTION)])[0].memories  # on by default
        assert on.generate([greedy("user:alice", CAT_QUESTION, memory=False)])[0].memories == ()
        raw = on.generate([GenerationRequest("user:alice", prompt="my cat")])[0]  # no chat: not applied
        assert raw.memories == ()
        with pytest.raises(InvalidConfig, match="needs chat messages"):
            on.generate([GenerationRequest("user:alice", prompt="my cat", memory=True)])
    with pytest.raises(InvalidConfig):
        MemoryConfig(k=0)


def test_token_budget_skips_entries_that_do_not_fit(store, tiny_base):
    from persona.serving.engine import Engine
    from persona.serving.memory import MemoryConfig

    long = Interaction(text="My cat " + "is a very fluffy and sleepy animal " * 12)
    store.log("user:alice", [long, CAT])
    with Engine(store, max_resident=4, memory=MemoryConfig(k=4, max_tokens=20)) as engine:
        result, = engine.generate([greedy("user:alice", "my cat Tom fluffy")])
    cat_id = store.memory("user:alice").entries()[1].id
    assert result.memories == (cat_id,)  # the long entry scores higher but does not fit 20 tokens


def test_stack_uses_only_its_user_parts_memory(store, engine):
    store.log("user:alice", [CAT])
    store.log("user:bob", [Interaction(text="My cat is called Felix.")])
    store.log("domain:finance", [Interaction(text="My cat is called Luna.")])
    result, = engine.generate([greedy("user:alice+domain:finance", CAT_QUESTION, memory=True)])
    assert result.memories == tuple(e.id for e in store.memory("user:alice").entries())
    assert result.resolved[0].startswith("user:alice@")
    base, = engine.generate([greedy("domain:finance", CAT_QUESTION, memory=True)])
    assert base.memories == ()


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture
def server(store, engine):
    from conftest import loopback_server

    from persona.http.app import ServerConfig, create_app
    from persona.store.tokens import TokenStore

    tokens = TokenStore(store)
    secrets = {n: tokens.create(f"user:{n}")[0] for n in ("alice", "bob")}
    with loopback_server(create_app(engine, ServerConfig(auth=True, log_interactions=True))) as url:
        yield url, secrets


def chat(server, who, model, content, **extra):
    url, secrets = server
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {secrets[who]}"}, timeout=60)


def test_http_memory_true_returns_the_memory_ids_used(store, server):
    store.log("user:alice", [CAT, CITY])
    cat_id = store.memory("user:alice").entries()[0].id
    r = chat(server, "alice", "user:alice", CAT_QUESTION, memory=True)
    assert r.status_code == 200, r.text
    assert r.json()["resolved"]["memories"] == [cat_id]
    assert r.json()["resolved"]["adapters"][0].startswith("user:alice@v")
    assert "resolved" not in chat(server, "alice", "user:alice", CAT_QUESTION).json()  # OpenAI's shape when off
    assert chat(server, "alice", "user:alice", CAT_QUESTION, memory="yes").status_code == 400
    stream = chat(server, "alice", "user:alice", CAT_QUESTION, memory=True, stream=True)
    first = json.loads(stream.text.split("\n\n")[0].removeprefix("data: "))
    assert cat_id in first["resolved"]["memories"]  # with the chats the server logged since, which mention the cat


def test_http_memory_of_another_user_is_unreachable(store, server):
    store.log("user:alice", [CAT])
    alice_ids = {e.id for e in store.memory("user:alice").entries()}
    r = chat(server, "bob", "user:alice", CAT_QUESTION, memory=True)
    assert r.status_code == 404  # exactly as for the adapter itself
    assert r.json() == chat(server, "bob", "user:alice", CAT_QUESTION).json()
    own = chat(server, "bob", "user:bob", CAT_QUESTION, memory=True)
    assert own.status_code == 200 and not set(own.json()["resolved"]["memories"]) & alice_ids
    # the server logs bob's chat into bob's memory only; alice's facts never enter it
    assert all("Tom" not in e.text for e in store.memory("user:bob").entries())
    assert {e.id for e in store.memory("user:alice").entries()} == alice_ids


def test_logged_server_chat_is_in_memory_at_once(store, server):
    chat(server, "bob", "user:bob", "My dog is called Rex.")
    hits = store.memory("user:bob").search("What is my dog's name?")
    assert hits and hits[0].entry.text.startswith("User: My dog is called Rex.")


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_memory_json_shapes(run_cli):
    run_cli("create", "user:alice")
    run_cli("create", "domain:finance")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(json.dumps(CAT.to_json()) + "\n" + json.dumps(CITY.to_json()) + "\n")
        tmp_data = f.name
    run_cli("log", "user:alice", "--data", tmp_data)
    shown = json.loads(run_cli("memory", "show", "user:alice", "--json").output)
    assert shown["adapter"] == "user:alice" and shown["entries"] == 2 and len(shown["digest"]) == 64
    assert set(shown["items"][0]) == {"id", "time", "text", "source"}
    found = json.loads(run_cli("memory", "search", "user:alice", CAT_QUESTION, "-k", "1", "--json").output)
    assert found["hits"][0]["id"] == shown["items"][0]["id"] and found["hits"][0]["score"] > 0
    text = run_cli("memory", "forget", "user:alice", "--match", "lisbon").output
    assert "keep what they learned until the next retrain" in text
    data = json.loads(run_cli("memory", "forget", "user:alice", "--id", shown["items"][0]["id"], "--json").output)
    assert data["removed"] == {"memory": 1, "pending": 1, "replay": 0}
    refused = run_cli("memory", "show", "domain:finance", ok=False)
    assert refused.exit_code != 0 and "only user adapters keep one" in refused.output
    usage = run_cli("memory", "forget", "user:alice", ok=False)
    assert usage.exit_code == 2
    os.unlink(tmp_data)


def test_cli_generate_memory_json_and_refusals(run_cli):
    run_cli("create", "user:alice")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(json.dumps(CAT.to_json()) + "\n")
    run_cli("log", "user:alice", "--data", f.name)
    os.unlink(f.name)
    cat_id = json.loads(run_cli("memory", "show", "user:alice", "--json").output)["items"][0]["id"]
    out = json.loads(run_cli("generate", "user:alice", CAT_QUESTION, "--memory", "--max-new-tokens", "2",
                             "--json").output)
    assert out["memories"] == [cat_id]
    plain = json.loads(run_cli("generate", "user:alice", CAT_QUESTION, "--max-new-tokens", "2", "--json").output)
    assert plain["memories"] == []
    assert run_cli("generate", "user:alice", "x", "--memory", "--raw", ok=False).exit_code == 2
    assert run_cli("serve", "--memory", "--upstream", "http://127.0.0.1:9", ok=False).exit_code == 2


# ------------------------------------------------------------------------------------------ fused retrieval
LISBON, NURSE, TENNIS = (Interaction(text=t) for t in ("I live in Lisbon.", "I work as a nurse.", "I play tennis."))
HOME_QUESTION = "Where is home these days?"  # shares no word with any of the three


class FixedEmbedder:
    """A deterministic embedder for tests: each known text has a chosen vector (others: a fixed one);
    records every text it was asked to embed."""

    def __init__(self, vectors, key="test-base/test-embedding"):
        self.vectors, self.calls = vectors, []
        self.embedder = memory_store.TextEmbedder(key, self.embed)

    def embed(self, texts):
        self.calls.extend(texts)
        return [self.vectors.get(t, [0.0, 0.0, 0.0, 1.0]) for t in texts]


def near_lisbon():
    return FixedEmbedder({"I live in Lisbon.": [1.0, 0.0, 0.0, 0.0], "I work as a nurse.": [0.0, 1.0, 0.0, 0.0],
                          "I play tennis.": [0.0, 0.0, 1.0, 0.0], HOME_QUESTION: [0.9, 0.1, 0.1, 0.0]})


def test_fusion_ranks_an_entry_sharing_no_word_by_its_embedding(store):
    store.log("user:alice", [NURSE, TENNIS, LISBON])
    memory = store.memory("user:alice")
    assert memory.search(HOME_QUESTION, k=3) == []  # BM25 alone: no word in common, nothing found
    hits = memory.search(HOME_QUESTION, k=3, embedder=near_lisbon().embedder)
    assert [h.entry.text for h in hits] == ["I live in Lisbon.", "I work as a nurse.", "I play tennis."]
    assert hits[0].score == pytest.approx(1 / (memory_store.RRF_K + 1))
    # a word in common still counts: an entry in both rankings beats one in the embedding ranking only
    store.log("user:alice", [Interaction(text="These days I read a lot.")])
    top = memory.search(HOME_QUESTION, k=1, embedder=near_lisbon().embedder)[0]
    assert top.entry.text == "These days I read a lot." and top.score > 1 / (memory_store.RRF_K + 1)


def test_forgotten_entry_is_never_returned_from_the_embedding_cache(store):
    store.log("user:alice", [NURSE, TENNIS, LISBON])
    fixed = near_lisbon()
    memory = store.memory("user:alice")
    assert memory.search(HOME_QUESTION, k=1, embedder=fixed.embedder)[0].entry.text == "I live in Lisbon."
    memory.forget(match="Lisbon")
    fixed.calls.clear()
    hits = memory.search(HOME_QUESTION, k=3, embedder=fixed.embedder)
    assert [h.entry.text for h in hits] == ["I work as a nurse.", "I play tennis."]
    assert fixed.calls == [HOME_QUESTION]  # the kept entries' vectors were reused, none re-embedded
    # logged again, it is a new entry (new id), embedded anew
    store.log("user:alice", [LISBON])
    hits = memory.search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    assert hits[0].entry.text == "I live in Lisbon." and fixed.calls[1:] == ["I live in Lisbon.", HOME_QUESTION]


def test_a_logged_entry_is_embedded_once(store):
    store.log("user:alice", [NURSE, TENNIS])
    fixed = near_lisbon()
    store.memory("user:alice").search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    store.log("user:alice", [LISBON])
    fixed.calls.clear()
    store.memory("user:alice").search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    store.memory("user:alice").search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    assert fixed.calls == ["I live in Lisbon.", HOME_QUESTION, HOME_QUESTION]


def test_fusion_never_reaches_another_users_entries(store):
    store.log("user:alice", [NURSE, TENNIS])
    store.log("user:bob", [LISBON])  # bob's entry is the closest to the query of all
    fixed = near_lisbon()
    hits = store.memory("user:alice").search(HOME_QUESTION, k=4, embedder=fixed.embedder)
    assert {h.entry.text for h in hits} == {"I work as a nurse.", "I play tennis."}
    assert "I live in Lisbon." not in fixed.calls


def test_embedding_cache_never_crosses_adapters_or_embedders(store):
    store.log("user:alice", [LISBON])
    store.log("user:bob", [LISBON])  # the same text in two adapters: each embeds its own
    fixed = near_lisbon()
    alice = store.memory("user:alice").search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    bob = store.memory("user:bob").search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    assert fixed.calls.count("I live in Lisbon.") == 2
    assert alice[0].entry.id in {e.id for e in store.memory("user:alice").entries()}
    assert bob[0].entry.id in {e.id for e in store.memory("user:bob").entries()}
    other_base = FixedEmbedder(fixed.vectors, key="another-base/test-embedding")
    store.memory("user:alice").search(HOME_QUESTION, k=1, embedder=other_base.embedder)
    assert other_base.calls == ["I live in Lisbon.", HOME_QUESTION]  # another key: nothing reused


def test_engine_fuses_with_the_bases_embeddings_by_default(store):
    from persona.embed import SENTENCE_EMBEDDING_ID
    from persona.serving.engine import Engine
    from persona.serving.memory import MemoryConfig

    store.log("user:alice", [NURSE, TENNIS])
    store.log("user:bob", [LISBON])
    with Engine(store, max_resident=4, memory=True) as fused, \
            Engine(store, max_resident=4, memory=MemoryConfig(retrieval="bm25")) as lexical:
        assert fused.memory.retrieval == "fused"  # the default
        result, = fused.generate([greedy("user:alice", HOME_QUESTION)])
        assert lexical.generate([greedy("user:alice", HOME_QUESTION)])[0].memories == ()
        key = f"{fused.base.info.fingerprint}/{SENTENCE_EMBEDDING_ID}"
    alice = {e.id for e in store.memory("user:alice").entries()}
    assert set(result.memories) == alice  # found without a word in common, and only alice's
    cached = memory_store._indexes[str(folder(store, "user:alice"))]
    assert cached.vectors(memory_store.TextEmbedder(key, None)).shape[0] == 2  # embedded under the base's key
    with pytest.raises(InvalidConfig, match="retrieval"):
        MemoryConfig(retrieval="dense")


def test_vectors_survive_a_forget_and_a_log_between_fused_searches(store):
    store.log("user:alice", [NURSE, TENNIS, LISBON])
    fixed = near_lisbon()
    memory = store.memory("user:alice")
    memory.search(HOME_QUESTION, k=1, embedder=fixed.embedder)
    memory.forget(match="tennis")
    memory.search("nurse", k=1)  # a BM25 search rebuilds the index; no fused search in between
    store.log("user:alice", [Interaction(text="I read a lot.")])
    memory.search("nurse", k=1)
    fixed.calls.clear()
    hits = memory.search(HOME_QUESTION, k=4, embedder=fixed.embedder)
    assert fixed.calls == ["I read a lot.", HOME_QUESTION]  # the kept entries were not embedded again
    assert "I play tennis." not in [h.entry.text for h in hits]


def test_sentence_embedding_of_a_text_does_not_depend_on_its_batch(tiny_base):
    import torch

    from persona import load_base
    from persona.embed import embed_sentences

    base = load_base(tiny_base, device="cpu")
    alone = embed_sentences(base.model, base.tokenizer, ["I live in Lisbon."])
    batched = embed_sentences(base.model, base.tokenizer, ["A much longer text about many other things entirely.",
                                                           "I live in Lisbon."])
    assert alone.shape == (1, base.model.config.hidden_size)
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-5)  # the last real token, not a pad
    assert not torch.allclose(batched[0], alone[0])
