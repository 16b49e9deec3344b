import pytest

import math

from persona import AdapterRef, InvalidReference, StackPart, parse_ref, parse_stack
from persona.refs import MAX_WEIGHT, format_stack, format_weight, validate_alias, validate_name, parse_version
from persona.errors import InvalidName

# The hostile corpus: every one must be rejected as a name (and as a reference user:<name>).
HOSTILE_NAMES = [
    "", ".", "..", "../x", "../../etc/passwd", "/abs", "/etc/passwd", "a/b", "a\\b", "..\\x", "\\\\server\\share",
    "a\x00b", "\x00", "%2e%2e", "%2E%2E%2F", "..%2f", "a%00", "Alice", "ALICE", "alIce",
    "аlice",  # Cyrillic a
    "ａlice",  # fullwidth a
    "alice\u200b",  # zero-width space
    "ǎlice", "é", "a b", " alice", "alice ", "alice\n", "\talice", "-alice", "_alice", ".alice",
    "a" * 65, "x" * 1000, "~", "~root", "a:b", "a@b", "a+b", "a*b", "a?b", "con\x7f", "$HOME", "a;rm -rf",
    "C:\\Windows", "file:///etc", "a\rb",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_rejected(name):
    with pytest.raises(InvalidName):
        validate_name(name)
    if "@" in name:  # user:a@b is adapter a at alias b: legal, and not a name containing '@'
        assert AdapterRef.parse(f"user:{name}").name != name
        return
    with pytest.raises(InvalidReference):
        AdapterRef.parse(f"user:{name}")


def test_hostile_corpus_is_large_enough():
    assert len(set(HOSTILE_NAMES)) >= 30


@pytest.mark.parametrize("name", ["alice", "a", "0", "a.b", "a_b", "a-b", "user.42", "a" * 64, "x..y"])
def test_good_names_accepted(name):
    assert validate_name(name) == name
    assert AdapterRef.parse(f"domain:{name}").name == name


def test_parse_versions_and_aliases():
    assert AdapterRef.parse("user:alice") == AdapterRef("user", "alice")
    assert AdapterRef.parse("user:alice@v3").version == 3
    assert AdapterRef.parse("user:alice@v0003") == AdapterRef.parse("user:alice@v3")
    assert AdapterRef.parse("user:alice@candidate").alias == "candidate"
    assert AdapterRef.parse("merged:team@stable").selector == "stable"
    assert AdapterRef.parse("user:alice").selector == "current"
    assert str(AdapterRef.parse("user:alice@v0007")) == "user:alice@v7"
    assert str(AdapterRef.parse("user:alice@stable")) == "user:alice@stable"


@pytest.mark.parametrize(
    "text,rule",
    [
        ("alice", "KIND:NAME"),
        ("robot:alice", "kind must be one of"),
        ("user:alice@v0", "start at v1"),
        ("user:alice@", "alias must match"),
        ("user:alice@V3", "alias must match"),
        ("user:alice@v3@v4", "alias must match"),
        ("user:alice@Current", "alias must match"),
        ("user:a+domain:b", "is a stack"),
        ("user:", "name must match"),
        (":alice", "kind must be one of"),
    ],
)
def test_bad_references_state_the_rule(text, rule):
    with pytest.raises(InvalidReference, match=rule):
        parse_ref(text)


def test_stacks():
    parts = parse_stack("user:alice@v2+domain:finance")
    assert [str(p) for p in parts] == ["user:alice@v2", "domain:finance"]
    assert parse_stack("user:alice") == (StackPart(AdapterRef("user", "alice")),)
    assert all(p.weight == 1.0 for p in parts)
    for bad in ["", "user:a+", "+user:a", "user:a++domain:b", "user:a+user:a@v2", "user:a+user:a*0.5"]:
        with pytest.raises(InvalidReference):
            parse_stack(bad)


def test_weighted_stack_parts():
    parts = parse_stack("user:alice@v2+domain:finance*0.5+domain:law*2")
    assert [(str(p.ref), p.weight) for p in parts] == [("user:alice@v2", 1.0), ("domain:finance", 0.5), ("domain:law", 2.0)]
    assert format_stack(parts) == "user:alice@v2+domain:finance*0.5+domain:law*2"
    assert parse_stack("domain:x@stable*0.25")[0] == StackPart(AdapterRef("domain", "x", alias="stable"), 0.25)
    # a weight of 1, however written, is no weight: the same part, printed without it
    for one in ("user:alice*1", "user:alice*1.0", "user:alice*1.000"):
        assert parse_stack(one) == parse_stack("user:alice") and format_stack(parse_stack(one)) == "user:alice"
    assert parse_stack(f"user:a*{MAX_WEIGHT:g}")[0].weight == MAX_WEIGHT
    assert parse_stack("user:a*0.0001")[0].weight == 0.0001


@pytest.mark.parametrize("text,rule", [
    ("user:a*", "must be followed by a weight"),
    ("user:a*abc", "plain decimal"),
    ("user:a*-1", "plain decimal"),
    ("user:a*0", "greater than 0"),
    ("user:a*0.0", "leave it out of the stack"),
    ("user:a*nan", "plain decimal"),
    ("user:a*inf", "plain decimal"),
    ("user:a*1e-1", "plain decimal"),
    ("user:a*.5", "plain decimal"),
    ("user:a*2.", "plain decimal"),
    ("user:a*0x1", "plain decimal"),
    ("user:a*1_0", "plain decimal"),
    ("user:a* 0.5", "plain decimal"),
    ("user:a*10.5", "at most 10"),
    ("user:a*99999999999999999999", "at most 10"),
    ("user:a**0.5", "one '\\*' per part"),
    ("user:a*0.5*2", "one '\\*' per part"),
    ("user:a*0.5@v1", "a weight comes last"),
    ("*0.5", "KIND:NAME"),
    ("user:a*0.5+domain:b*", "must be followed by a weight"),
])
def test_bad_weights_state_the_rule(text, rule):
    with pytest.raises(InvalidReference, match=rule):
        parse_stack(text)


def test_weights_are_refused_where_a_single_adapter_is_expected():
    with pytest.raises(InvalidReference, match="only a part of a stack"):
        parse_ref("user:alice*0.5")
    for bad in (0, -1.0, math.nan, math.inf, 10.01, True, "0.5"):
        with pytest.raises(InvalidReference):
            StackPart(AdapterRef("user", "a"), bad)
    with pytest.raises(InvalidReference):
        StackPart("user:a", 0.5)


@pytest.mark.parametrize("weight", [0.5, 2.0, 0.1, 1 / 3, 0.7310585786300049, 2.06e-9, 9.999999999999998, 1e-300])
def test_weights_print_as_plain_decimals_that_parse_back_exactly(weight):
    text = format_weight(weight)
    assert "e" not in text and parse_stack(f"user:a*{text}")[0].weight == weight


def test_alias_rules():
    assert validate_alias("stable") == "stable"
    for bad in ["v3", "V", "", "9lives", "a" * 33, "sta ble"]:
        with pytest.raises(InvalidName):
            validate_alias(bad)


def test_parse_version_forms():
    assert parse_version("v12") == 12 and parse_version("12") == 12 and parse_version(4) == 4
    for bad in ["v", "x3", "v-1", "0", True, -2, "v1.5"]:
        with pytest.raises(InvalidReference):
            parse_version(bad)


def test_errors_inherit_builtins():
    with pytest.raises(ValueError):
        parse_ref("nope")
