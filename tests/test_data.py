"""persona.interactions (validation, digest, appending), persona.training.tokenize (loss masks,
truncation) and persona.training.batches (batching)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from persona import interactions as data
from persona.interactions import (
    Interaction,
    append_jsonl,
    data_digest,
    parse_interactions,
    read_interactions,
)
from persona.training.batches import iter_batches
from persona.training.tokenize import Example, tokenize_interactions
from persona.errors import InvalidConfig, InvalidInteractions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "interactions"

CHAT = {
    "messages": [
        {"role": "system", "content": "You answer tersely."},
        {"role": "user", "content": "What is my dog called?"},
        {"role": "assistant", "content": "Biscuit."},
        {"role": "user", "content": "And where do I live?"},
        {"role": "assistant", "content": "Lisbon, by the river.\nNear the castle."},
    ]
}
COMPLETION = {"prompt": "What is 2+2?", "completion": "4, of course."}
TEXT = {"text": "Biscuit is a beagle who lives in Lisbon."}


def jsonl(*objs) -> str:
    return "\n".join(json.dumps(o) for o in objs) + "\n"


def write(tmp_path: Path, content: str | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def labelled_spans(tokenizer, example: Example) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def make_example(length: int, tag: int = 0) -> Example:
    ids = tuple(range(10 + tag, 10 + tag + length))
    return Example(ids, (-100,) + ids[1:])


# --- parsing ---------------------------------------------------------------------------------


def test_each_format_parses_with_its_line_number(tmp_path):
    path = write(tmp_path, jsonl(CHAT, COMPLETION) + "\n   \n" + json.dumps(TEXT) + "\n")
    got = read_interactions(path)
    assert [i.format for i in got] == ["chat", "completion", "text"]
    assert [i.line for i in got] == [1, 2, 5]  # blank lines count
    assert all(i.source == str(path) for i in got)
    assert got[0].messages[0] == ("system", "You answer tersely.")
    assert got[0].messages[-1] == ("assistant", "Lisbon, by the river.\nNear the castle.")
    assert (got[1].prompt, got[1].completion) == ("What is 2+2?", "4, of course.")
    assert got[2].text == TEXT["text"]


def test_parse_interactions_accepts_one_string_or_lines():
    from_string = parse_interactions(jsonl(COMPLETION, TEXT), source="req")
    from_lines = parse_interactions([json.dumps(COMPLETION), json.dumps(TEXT)], source="req")
    assert from_string == from_lines
    assert [i.line for i in from_string] == [1, 2]


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + jsonl(TEXT, COMPLETION).replace("\n", "\r\n").encode())
    assert [i.format for i in read_interactions(path)] == ["text", "completion"]


def test_non_alternating_chat_is_accepted():
    chat = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ]
    }
    (i,) = parse_interactions([json.dumps(chat)])
    assert [r for r, _ in i.messages] == ["user", "user", "assistant", "user"]


BAD_LINES = [
    pytest.param(b'{"text": "caf\xe9"}', "not valid UTF-8", id="not-utf8"),
    pytest.param(b'{"text": "a\x00b"}', "NUL", id="binary"),
    pytest.param(b'{"text": "unterminated}', "not valid JSON", id="not-json"),
    pytest.param(b'["text", "hello"]', "expected a JSON object", id="not-object"),
    pytest.param(b'"hello"', "got a string", id="json-string"),
    pytest.param(b"{}", "empty object", id="empty-object"),
    pytest.param(
        b'{"text": "a", "lang": "en"}',
        "unknown key 'lang' (allowed: completion, messages, prompt, supersedes, text)",
        id="unknown-key",
    ),
    pytest.param(b'{"text": "a", "text": "b"}', "duplicate key 'text'", id="duplicate-key"),
    pytest.param(b'{"text": "a", "prompt": "b", "completion": "c"}', "mixes formats", id="mixed-formats"),
    pytest.param(b'{"prompt": "a"}', "needs 'completion'", id="prompt-alone"),
    pytest.param(b'{"text": "   \\n "}', "'text' is empty", id="whitespace-text"),
    pytest.param(b'{"prompt": "", "completion": "b"}', "'prompt' is empty", id="empty-prompt"),
    pytest.param(b'{"text": 3}', "'text' must be a string, got a number", id="number-text"),
    pytest.param(
        b'{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "x"}]}',
        "messages[0].content must be a string, got null",
        id="null-content",
    ),
    pytest.param(
        b'{"messages": [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}',
        "content parts",
        id="content-parts",
    ),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}',
        "messages[1].content is empty",
        id="empty-content",
    ),
    pytest.param(b'{"messages": [{"role": "bot", "content": "a"}]}', "role is 'bot'", id="wrong-role"),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
        b'{"role": "assistant", "content": "c"}]}',
        "only the first message may be 'system'",
        id="late-system",
    ),
    pytest.param(
        b'{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
        "no assistant turn",
        id="no-assistant",
    ),
    pytest.param(b'{"messages": []}', "'messages' is empty", id="no-messages"),
    pytest.param(b'{"messages": {"role": "user"}}', "must be an array", id="messages-object"),
    pytest.param(
        b'{"messages": [{"role": "assistant", "content": "a", "weight": 0}]}',
        "unknown key 'weight' (allowed: role, content)",
        id="message-unknown-key",
    ),
    pytest.param(b'{"messages": [{"role": "assistant"}]}', "has no 'content'", id="message-no-content"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_bad_line_is_refused_naming_file_and_line(tmp_path, bad, reason):
    path = write(tmp_path, jsonl(TEXT).encode() + b"\n" + bad + b"\n" + jsonl(COMPLETION).encode())
    with pytest.raises(InvalidInteractions) as err:
        read_interactions(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: "), message
    assert reason in message
    assert "\n" not in message  # one bad line: one line of message


def test_line_over_the_length_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 100)
    long_line = json.dumps({"text": "x" * 200})
    path = write(tmp_path, jsonl(TEXT) + long_line + "\n" + json.dumps({"text": "y" * 80}) + "\n")
    with pytest.raises(InvalidInteractions, match=rf"^{path}:2: line is 212 bytes, over the limit of 100"):
        read_interactions(path)
    with pytest.raises(InvalidInteractions, match=r"^t:2: line is 212 bytes"):
        parse_interactions([json.dumps(TEXT), long_line], source="t")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(InvalidInteractions, match="file is empty") as err:
        read_interactions(path)
    assert str(err.value).startswith(str(path))


def test_several_bad_lines_are_reported_together_and_nothing_is_returned(tmp_path):
    path = write(tmp_path, jsonl(TEXT) + "not json\n" + jsonl(COMPLETION) + '{"text": ""}\n[1]\n')
    with pytest.raises(InvalidInteractions) as err:
        read_interactions(path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"3 bad lines in {path}")
    assert [line.split(": ")[0] for line in lines[1:]] == [f"{path}:2", f"{path}:4", f"{path}:5"]


def test_error_report_is_capped_but_counts_every_bad_line():
    lines = ["nope"] * 30 + [json.dumps(TEXT)]
    with pytest.raises(InvalidInteractions) as err:
        parse_interactions(lines, source="many")
    report = str(err.value).splitlines()
    assert report[0].startswith("30 bad lines in many (the first 20 below)")
    assert len(report) == 1 + data.MAX_REPORTED_ERRORS
    assert report[-1].startswith("many:20: not valid JSON")


def test_binary_file_stops_at_the_first_nul(tmp_path):
    path = write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n" + b"\x00garbage\n" * 50)
    with pytest.raises(InvalidInteractions) as err:
        read_interactions(path)
    report = str(err.value).splitlines()
    # the signature's non-UTF-8 line, a control character that is not JSON, then the first NUL line
    assert report[0].startswith("3 bad lines")
    assert report[-1].startswith(f"{path}:3: ")
    assert "binary" in report[-1]


def test_interaction_built_directly_is_validated():
    with pytest.raises(InvalidInteractions, match="^api:7: .*no assistant turn"):
        Interaction(messages=(("user", "hi"),), source="api", line=7)
    with pytest.raises(InvalidInteractions, match="mixes formats"):
        Interaction(text="a", prompt="b", completion="c")
    with pytest.raises(InvalidInteractions, match="from_json"):
        Interaction(messages=[{"role": "assistant", "content": "x"}])
    assert Interaction(messages=[["user", "a"], ["assistant", "b"]]).messages == (("user", "a"), ("assistant", "b"))


@pytest.mark.parametrize("obj", [CHAT, COMPLETION, TEXT], ids=["chat", "completion", "text"])
def test_round_trip_to_json_from_json(obj):
    interaction = Interaction.from_json(obj, source="s", line=4)
    assert interaction.to_json() == obj
    again = Interaction.from_json(json.loads(json.dumps(interaction.to_json())))
    assert again == interaction
    assert hash(again) == hash(interaction)  # source and line are not part of identity
    assert (again.source, again.line) == ("<input>", 1)


# --- tokenization ----------------------------------------------------------------------------


def test_chat_labels_cover_exactly_each_assistant_turn(tokenizer):
    interaction = Interaction.from_json(CHAT)
    ts = tokenize_interactions([interaction], tokenizer)
    (example,) = ts.examples
    assert labelled_spans(tokenizer, example) == [
        "Biscuit.<|im_end|>",
        "Lisbon, by the river.\nNear the castle.<|im_end|>",
    ]
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    assert (ts.truncated, ts.dropped) == (0, 0)


def test_chat_labels_with_default_system_prompt_and_repeated_content(tokenizer):
    # The template injects a default system prompt mentioning "Hugging Face"; the assistant
    # content must be found in its own turn, not inside that prompt or the user's echo.
    chat = {
        "messages": [
            {"role": "user", "content": "Hugging Face"},
            {"role": "assistant", "content": "Hugging Face"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": " spaced  "},
        ]
    }
    (example,) = tokenize_interactions([Interaction.from_json(chat)], tokenizer).examples
    assert labelled_spans(tokenizer, example) == ["Hugging Face<|im_end|>", " spaced  <|im_end|>"]


def test_chat_starting_with_assistant_is_labelled_in_its_turn(tokenizer):
    chat = {"messages": [{"role": "assistant", "content": "Hugging Face"}, {"role": "user", "content": "ok"}]}
    (example,) = tokenize_interactions([Interaction.from_json(chat)], tokenizer).examples
    assert labelled_spans(tokenizer, example) == ["Hugging Face<|im_end|>"]


def test_prompt_completion_is_a_chat_with_loss_on_the_completion_only(tokenizer):
    (example,) = tokenize_interactions([Interaction.from_json(COMPLETION)], tokenizer).examples
    assert labelled_spans(tokenizer, example) == ["4, of course.<|im_end|>"]
    # inference renders the prompt with the same template, so training matches it
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": COMPLETION["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(example.input_ids).startswith(prompt)
    first_label = next(k for k, label in enumerate(example.labels) if label != -100)
    assert tokenizer.decode(example.input_ids[:first_label]) == prompt


def test_text_is_trained_on_every_token_plus_eos(tokenizer):
    (example,) = tokenize_interactions([Interaction.from_json(TEXT)], tokenizer).examples
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[:-1]) == TEXT["text"]


def test_truncation_keeps_the_start_and_is_counted(tokenizer):
    long_answer = {
        "messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 200}]
    }
    short = Interaction.from_json(COMPLETION)
    full = tokenize_interactions([Interaction.from_json(long_answer)], tokenizer, max_length=4096).examples[0]
    ts = tokenize_interactions([Interaction.from_json(long_answer), short], tokenizer, max_length=64)
    assert (ts.truncated, ts.dropped, len(ts)) == (1, 0, 2)
    assert ts.examples[0].input_ids == full.input_ids[:64]
    assert ts.examples[0].labels == full.labels[:64]
    assert all(len(e) <= 64 for e in ts)


def test_example_with_nothing_left_to_train_is_dropped_and_counted(tokenizer):
    long_prompt = {"prompt": "context " * 200, "completion": "yes"}
    ts = tokenize_interactions(
        [Interaction.from_json(long_prompt), Interaction.from_json(TEXT)], tokenizer, max_length=32
    )
    assert (ts.truncated, ts.dropped, len(ts)) == (0, 1, 1)
    assert ts.examples[0].labels == ts.examples[0].input_ids


def test_bad_max_length_is_refused(tokenizer):
    with pytest.raises(InvalidConfig, match="max_length"):
        tokenize_interactions([Interaction.from_json(TEXT)], tokenizer, max_length=0)


def test_template_refusal_names_file_and_line(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    chat = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    }
    (interaction,) = parse_interactions(["", json.dumps(chat)], source="chats.jsonl")
    with pytest.raises(InvalidInteractions, match="^chats.jsonl:2: .*roles must alternate"):
        tokenize_interactions([interaction], strict)


# --- batching --------------------------------------------------------------------------------


def test_batches_pad_only_to_the_batch_maximum():
    examples = [make_example(n) for n in (3, 9, 4, 4, 7)]
    batches = list(iter_batches(examples, 2, seed=0, shuffle=False, pad_token_id=0, group_by_length=False))
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 9), (2, 4), (1, 7)]
    first = batches[0]
    assert first.attention_mask.tolist()[0] == [1, 1, 1] + [0] * 6
    assert first.input_ids.tolist()[0] == [10, 11, 12] + [0] * 6  # right padding
    assert first.labels.tolist()[0] == [-100, 11, 12] + [-100] * 6
    assert first.num_tokens == 12
    assert first.num_target_tokens == 2 + 8


def test_batches_cover_every_example_exactly_once_and_group_by_length():
    examples = [make_example(n, tag=1000 * n) for n in [(7 * k) % 64 + 1 for k in range(64)]]
    batches = list(iter_batches(examples, 8, seed=3, pad_token_id=0))
    seen = sorted(row[0] for b in batches for row in b.input_ids.tolist())
    assert seen == sorted(e.input_ids[0] for e in examples)
    for b in batches:  # 64 examples fit one length group: each batch holds 8 neighbouring lengths
        lengths = b.attention_mask.sum(1).tolist()
        assert max(lengths) - min(lengths) == 7
        assert b.input_ids.shape[1] == max(lengths)
    assert batches[0].input_ids.shape[1] == 64  # the longest batch first


def test_batches_are_deterministic_by_seed():
    examples = [make_example(n % 23 + 1, tag=n * 100) for n in range(300)]

    def rows(seed):
        return [b.input_ids.tolist() for b in iter_batches(examples, 4, seed=seed, pad_token_id=0)]

    assert rows(1) == rows(1)
    assert rows(1) != rows(2)


def test_batches_of_tokenized_set(tokenizer):
    ts = tokenize_interactions([Interaction.from_json(o) for o in (CHAT, COMPLETION, TEXT)], tokenizer)
    batches = list(iter_batches(ts, 2, seed=0, pad_token_id=tokenizer.pad_token_id))
    assert sum(b.input_ids.shape[0] for b in batches) == 3
    assert sum(b.num_target_tokens for b in batches) == ts.num_target_tokens
    assert sum(b.num_tokens for b in batches) == ts.num_tokens


# --- digest and appending --------------------------------------------------------------------


def test_digest_is_stable_order_sensitive_and_ignores_provenance():
    a, b = Interaction.from_json(TEXT), Interaction.from_json(COMPLETION)
    canonical = (
        '{"text":"Biscuit is a beagle who lives in Lisbon."}\n{"completion":"4, of course.","prompt":"What is 2+2?"}\n'
    )
    assert data_digest([a, b]) == hashlib.sha256(canonical.encode()).hexdigest()
    assert data_digest([a, b]) != data_digest([b, a])
    assert data_digest([Interaction(text=a.text, source="elsewhere", line=99), b]) == data_digest([a, b])
    assert data_digest([Interaction(text=a.text + "!"), b]) != data_digest([a, b])


def test_append_jsonl_round_trips_through_read(tmp_path):
    path = tmp_path / "pending.jsonl"
    first = [Interaction.from_json(CHAT), Interaction.from_json(TEXT)]
    assert append_jsonl(path, first) == 2
    assert append_jsonl(path, [Interaction.from_json(COMPLETION)]) == 1
    assert append_jsonl(path, []) == 0
    got = read_interactions(path)
    assert got == first + [Interaction.from_json(COMPLETION)]
    assert [i.line for i in got] == [1, 2, 3]


def test_append_jsonl_after_a_torn_write_keeps_the_new_line_intact(tmp_path):
    path = write(tmp_path, jsonl(TEXT) + '{"text": "half writ', "pending.jsonl")
    append_jsonl(path, [Interaction.from_json(COMPLETION)])
    with pytest.raises(InvalidInteractions) as err:
        read_interactions(path)
    assert str(err.value).startswith(f"{path}:2: not valid JSON")  # only the torn line is bad
    assert path.read_text().splitlines()[2] == '{"completion":"4, of course.","prompt":"What is 2+2?"}'


def test_append_jsonl_takes_only_interactions(tmp_path):
    with pytest.raises(TypeError):
        append_jsonl(tmp_path / "p.jsonl", [TEXT])
    assert not (tmp_path / "p.jsonl").exists()


# --- sample data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("alice", 40, 60),
        ("bob", 40, 60),
        ("carol", 40, 60),
        ("alice-2", 30, 40),
        ("alice-3", 30, 40),
        ("domain-finance", 50, 50),
        ("domain-medicine", 50, 50),
        ("domain-cooking", 50, 50),
    ],
)
def test_sample_interaction_files_are_valid(name, low, high, tokenizer):
    interactions = read_interactions(EXAMPLES / f"{name}.jsonl")
    assert low <= len(interactions) <= high
    assert len(set(interactions)) == len(interactions)  # no duplicate lines
    assert sum(i.format == "chat" for i in interactions) >= len(interactions) * 0.8
    ts = tokenize_interactions(interactions, tokenizer, max_length=512)
    assert (ts.truncated, ts.dropped) == (0, 0)
    for interaction, example in zip(interactions, ts.examples, strict=True):
        messages = interaction.messages or (("user", interaction.prompt), ("assistant", interaction.completion))
        expected = [content + "<|im_end|>" for role, content in messages if role == "assistant"]
        assert labelled_spans(tokenizer, example) == expected, interaction.line


@pytest.mark.parametrize(
    "name, facts",
    [("alice", ["Biscuit", "Lisbon"]), ("bob", ["Nimbus", "Oslo", "Arr"]), ("carol", ["Nairobi", "chemist"])],
)
def test_sample_users_repeat_their_facts(name, facts):
    interactions = read_interactions(EXAMPLES / f"{name}.jsonl")
    answers = " ".join(i.messages[-1][1] if i.messages else i.completion for i in interactions)
    for fact in facts:
        assert answers.count(fact) >= 5, fact


@pytest.mark.parametrize("fields", [{"text": "hi \ud800"}, {"prompt": "\udfff", "completion": "ok"},
                                    {"messages": (("user", "hi"), ("assistant", "a \ud83d b"))}])
def test_interaction_with_a_lone_surrogate_is_refused_however_it_is_built(fields):
    with pytest.raises(InvalidInteractions, match="lone surrogate"):
        Interaction(**fields)


def test_interaction_with_a_paired_astral_character_is_accepted():
    assert Interaction(text="dog \U0001f415").text == "dog \U0001f415"


def test_interactions_and_tokenize_import_without_torch():
    """The store reads and appends interactions: a core module that must not pull torch in (issue 12)."""
    import subprocess
    import sys

    package = Path(__file__).resolve().parent.parent / "persona"
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('persona'); pkg.__path__ = [{str(package)!r}]\n"
        "sys.modules['persona'] = pkg  # the package's eager __init__ is not what this test is about\n"
        "import persona.interactions, persona.training.tokenize, persona.training.gate\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
